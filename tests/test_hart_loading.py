"""HART loading: a tiny random checkpoint written by this test in the official hart-0.7b-1024px key layout (names
and torch shapes enumerated here, independently of the loader's renaming rules); the Qwen2 text encoder against
Hugging Face transformers; the hart_1024 experiment end to end on both."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.hart import HART, HARTConfig, HARTTokenizer, HARTTransformer, SampleOptions, TokenizerConfig
from jaxeff.hart.loading import CheckpointMismatchError, load_hart, save_hart
from jaxeff.hart.pipeline import program_peak_bytes
from jaxeff.hart.text import SYSTEM_PROMPT, TextEncoder
from jaxeff.hart.transformer import filter_logits
from jaxeff.io.safetensors import save_file

C, DEPTH, HEADS, CTX_T, CTX_D, V, CV, PNS = 32, 2, 2, 3, 32, 64, 8, (1, 2, 3, 4)
FFN = int((C * 4 * 2) / 3 + 255) // 256 * 256
DW, DD = 32, 2
CH, MULT = 16, (1, 2, 2)


def _llm_tensors(rng):
    t = {}

    def lin(name, o, i, bias=True):
        t[f"{name}.weight"] = rng.normal(size=(o, i)).astype(np.float32) * 0.2
        if bias:
            t[f"{name}.bias"] = rng.normal(size=(o,)).astype(np.float32) * 0.1

    lin("word_embed", C, CV)
    lin("context_embed", C, CTX_D)
    t["lvl_embed.weight"] = rng.normal(size=(len(PNS), C)).astype(np.float32)
    for i in range(DEPTH):
        p = f"blocks.{i}"
        lin(f"{p}.attn.qkv_proj", 3 * C, C, bias=False)
        t[f"{p}.attn.q_bias"] = rng.normal(size=(C,)).astype(np.float32)
        t[f"{p}.attn.v_bias"] = rng.normal(size=(C,)).astype(np.float32)
        t[f"{p}.attn.zero_k_bias"] = np.zeros((C,), np.float32)  # buffer, ignored
        lin(f"{p}.attn.proj", C, C)
        lin(f"{p}.ffn.gate_proj", FFN, C, bias=False)
        lin(f"{p}.ffn.up_proj", FFN, C, bias=False)
        lin(f"{p}.ffn.down_proj", C, FFN, bias=False)
        lin(f"{p}.ada_lin.1", 6 * C, C)
        t[f"{p}.ln_wo_grad.weight"] = 1 + rng.normal(size=(C,)).astype(np.float32) * 0.1
    t["head_nm.ln_wo_grad.weight"] = np.ones((C,), np.float32)
    lin("head_nm.ada_lin.1", 2 * C, C)
    lin("head", V, C)
    t["decoder_norm.weight"] = np.ones((C,), np.float32)
    n = "diffloss.net"
    lin(f"{n}.time_embed.mlp.0", DW, 256)
    lin(f"{n}.time_embed.mlp.2", DW, DW)
    lin(f"{n}.cond_embed", DW, C)
    lin(f"{n}.input_proj", DW, CV)
    for i in range(DD):
        t[f"{n}.res_blocks.{i}.in_ln.weight"] = np.ones((DW,), np.float32)
        t[f"{n}.res_blocks.{i}.in_ln.bias"] = np.zeros((DW,), np.float32)
        lin(f"{n}.res_blocks.{i}.mlp.0", DW, DW)
        lin(f"{n}.res_blocks.{i}.mlp.2", DW, DW)
        lin(f"{n}.res_blocks.{i}.adaLN_modulation.1", 3 * DW, DW)
    lin(f"{n}.final_layer.linear", 2 * CV, DW)
    lin(f"{n}.final_layer.adaLN_modulation.1", 2 * DW, DW)
    t["attn_bias_for_masking"] = np.zeros((1, 1, 4, 4), np.float32)  # buffers, ignored
    t["lvl_1L"] = np.zeros((1, 4), np.int64)
    return t


def _tok_tensors(rng):
    t = {}

    def conv(name, o, i, k):
        t[f"{name}.weight"] = rng.normal(size=(o, i, k, k)).astype(np.float32) * 0.1
        t[f"{name}.bias"] = rng.normal(size=(o,)).astype(np.float32) * 0.01

    def norm(name, c):
        t[f"{name}.weight"] = np.ones((c,), np.float32)
        t[f"{name}.bias"] = np.zeros((c,), np.float32)

    def res(name, i, o):
        norm(f"{name}.norm1", i)
        conv(f"{name}.conv1", o, i, 3)
        norm(f"{name}.norm2", o)
        conv(f"{name}.conv2", o, o, 3)
        if i != o:
            conv(f"{name}.nin_shortcut", o, i, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        conv(f"{name}.qkv", 3 * c, c, 1)
        conv(f"{name}.proj_out", c, c, 1)

    e = "vae.encoder"
    conv(f"{e}.conv_in", CH, 3, 3)
    cin = CH
    for lvl, m in enumerate(MULT):  # 1 res block per level
        res(f"{e}.down.{lvl}.block.0", cin, CH * m)
        cin = CH * m
        if lvl == len(MULT) - 1:
            attn(f"{e}.down.{lvl}.attn.0", cin)
        else:
            conv(f"{e}.down.{lvl}.downsample.conv", cin, cin, 3)
    for pre in (e, "vae.decoder"):
        res(f"{pre}.mid.block_1", cin, cin)
        attn(f"{pre}.mid.attn_1", cin)
        res(f"{pre}.mid.block_2", cin, cin)
    norm(f"{e}.norm_out", cin)
    conv(f"{e}.conv_out", CV, cin, 3)
    d = "vae.decoder"
    conv(f"{d}.conv_in", cin, CV, 3)
    for lvl in reversed(range(len(MULT))):
        for j in range(2):
            res(f"{d}.up.{lvl}.block.{j}", cin, CH * MULT[lvl])
            cin = CH * MULT[lvl]
            if lvl == len(MULT) - 1:
                attn(f"{d}.up.{lvl}.attn.{j}", cin)
        if lvl:
            conv(f"{d}.up.{lvl}.upsample.conv", cin, cin, 3)
    norm(f"{d}.norm_out", cin)
    conv(f"{d}.conv_out", 3, cin, 3)
    conv("vae.quant_conv", CV, CV, 3)
    conv("vae.post_quant_conv", CV, CV, 3)
    t["vae.quantize.embedding.weight"] = rng.normal(size=(V, CV)).astype(np.float32)
    for k in range(4):
        conv(f"vae.quantize.quant_resi.qresi_ls.{k}", CV, CV, 3)
    t["vae.quantize.ema_vocab_hit_SV"] = np.zeros((10, V), np.float32)
    t["disc.dino_proxy.0.weight"] = np.zeros((2, 2), np.float32)  # discriminator, skipped
    return t


def _write(root, llm, tok):
    (root / "llm").mkdir(parents=True)
    (root / "tokenizer").mkdir()
    (root / "llm" / "config.json").write_text(json.dumps(dict(
        model_type="hart_transformer_t2i", embed_dim=C, depth=DEPTH, num_heads=HEADS, context_token=CTX_T,
        context_dim=CTX_D, patch_nums=list(PNS), attn_type="llama", mlp_type="llama", diff_width=DW, diff_depth=DD,
        num_sampling_steps="8", mlp_ratio=4.0)))
    (root / "tokenizer" / "config.json").write_text(json.dumps(dict(
        model_type="hart_autoencoder_with_disc", vocab_size=V, z_channels=CV, ch=CH, ch_mult=list(MULT),
        quantizer_type="var_hybrid", share_quant_resi=4,
        v_patch_nums=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16],
        num_res_blocks=1, norm_groups=8)))  # jaxeff extension keys (the released tokenizer uses the defaults 2, 32)
    save_file(llm, root / "llm" / "ema_model.safetensors")
    save_file(tok, root / "tokenizer" / "model.safetensors")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    rng = np.random.default_rng(0)
    llm, tok = _llm_tensors(rng), _tok_tensors(rng)
    root = tmp_path_factory.mktemp("hart") / "hart-tiny"
    _write(root, llm, tok)
    return root, llm, tok


def test_loader_values_and_errors(ckpt, tmp_path):
    root, llm, tok_t = ckpt
    model, tok = load_hart(root)
    x = np.random.default_rng(1).normal(size=(2, CV)).astype(np.float32)
    ref = x @ llm["word_embed.weight"].T + llm["word_embed.bias"]
    np.testing.assert_allclose(model.word_embed(jnp.asarray(x)), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(model.blocks[1].attn.q_bias[...], llm["blocks.1.attn.q_bias"])
    np.testing.assert_array_equal(model.diffloss.res_blocks[1].ada.kernel[...],
                                  llm["diffloss.net.res_blocks.1.adaLN_modulation.1.weight"].T)
    np.testing.assert_array_equal(tok.quantize.quant_resi[2].conv.kernel[...],
                                  tok_t["vae.quantize.quant_resi.qresi_ls.2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(tok.decoder.conv_blocks[-2].upsample.conv.bias[...],
                                  tok_t["vae.decoder.up.1.upsample.conv.bias"])
    torch = pytest.importorskip("torch")
    img = np.random.default_rng(2).normal(size=(1, 16, 16, 3)).astype(np.float32)
    ref = torch.nn.functional.conv2d(torch.from_numpy(img).permute(0, 3, 1, 2),
                                     torch.from_numpy(tok_t["vae.encoder.conv_in.weight"]),
                                     torch.from_numpy(tok_t["vae.encoder.conv_in.bias"]), padding=1)
    np.testing.assert_allclose(tok.encoder.conv_in(jnp.asarray(img)), ref.permute(0, 2, 3, 1).numpy(), atol=1e-4)
    # PyTorch .bin weights (the released llm/ema_model.bin) load through the optional torch converter
    bin_root = tmp_path / "bin"
    _write(bin_root, {"unused": np.zeros((1,), np.float32)}, tok_t)
    (bin_root / "llm" / "ema_model.safetensors").unlink()
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in llm.items()},
               bin_root / "llm" / "ema_model.bin")
    model_bin, _ = load_hart(bin_root)
    np.testing.assert_array_equal(model_bin.head.kernel[...], llm["head.weight"].T)
    # errors name the offending keys
    bad = dict(llm)
    del bad["blocks.0.attn.v_bias"]
    bad["blocks.0.extra.weight"] = np.zeros((1,), np.float32)
    bad["head.bias"] = np.zeros((V + 1,), np.float32)
    broken = tmp_path / "broken"
    _write(broken, bad, tok_t)
    with pytest.raises(CheckpointMismatchError) as e:
        load_hart(broken)
    msg = str(e.value)
    assert "blocks.0.attn.v_bias" in msg and "blocks.0.extra.weight" in msg and "head.bias" in msg


def test_from_pretrained_generates(ckpt):
    root, _, _ = ckpt
    hart = HART.from_pretrained(root)
    ctx = jax.random.normal(jax.random.key(0), (2, CTX_T, CTX_D))
    opts = SampleOptions(cfg=3.0, top_k=10, top_k_late=5)
    a = hart.generate(context=ctx, seed=1, opts=opts)
    b = hart.generate(context=ctx, seed=1, opts=opts)
    assert a.shape == (2, 16, 16, 3) and float(a.min()) >= 0 and float(a.max()) <= 1
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="context must be"):
        hart.generate(context=ctx[:, :2], seed=1, opts=opts)


WORDS = "a cat dog red blue sleeping on the mat sky prompt user".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    torch = pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("qwen2tiny")
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(d)
    cfg = transformers.Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    return d


def _reference(model_dir, prompts, max_length):
    """The reference `encode_prompts` with use_llm_system_prompt=True, through Hugging Face Qwen2."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    lm = transformers.AutoModel.from_pretrained(model_dir).eval()
    ids = torch.stack([tok(p, return_tensors="pt", padding="max_length", max_length=max_length,
                           truncation=True).input_ids[0] for p in prompts])
    mask = ids != tok.pad_token_id
    sys_ids = tok(SYSTEM_PROMPT, return_tensors="pt").input_ids.repeat(len(prompts), 1)
    with torch.no_grad():
        h = lm(torch.cat([sys_ids, ids], 1), attention_mask=torch.cat([torch.ones_like(sys_ids).bool(), mask], 1),
               output_hidden_states=True).hidden_states[-1][:, sys_ids.shape[1]:]
    return h.numpy(), mask.numpy(), (torch.cumsum(mask, 1) - 1).numpy()


def test_text_encoder_matches_transformers(model_dir):
    prompts = ["a red cat sleeping on the mat", "blue sky", "a dog a dog a dog a dog a dog a dog a dog"]
    enc = TextEncoder.from_pretrained(model_dir, max_length=10)
    ctx, mask, pos = enc(prompts)
    ref_h, ref_mask, ref_pos = _reference(model_dir, prompts, 10)
    assert ctx.shape == (3, 10, 32)
    np.testing.assert_array_equal(np.asarray(mask), ref_mask)
    np.testing.assert_array_equal(np.asarray(pos), ref_pos)
    np.testing.assert_allclose(np.asarray(ctx), ref_h, atol=2e-4, rtol=1e-3)  # padded positions included


def test_save_hart_round_trip(tmp_path):
    """save_hart writes the released layout that load_hart reads back exactly (config and every weight); bfloat16
    loading (transformer and tokenizer autoencoder) keeps the norm weights and the quantizer in float32; an existing
    checkpoint is not overwritten."""
    tcfg = TokenizerConfig(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8,
                           patch_nums=(1, 2, 3))
    hcfg = HARTConfig(embed_dim=32, depth=1, num_heads=2, context_token=3, context_dim=12, vocab_size=64, cvae=8,
                      patch_nums=(1, 2, 3), diff_width=32, diff_depth=1, attn_l2_norm=True)
    model, tok = HARTTransformer(hcfg, rngs=nnx.Rngs(0)), HARTTokenizer(tcfg, rngs=nnx.Rngs(1))
    root = save_hart(model, tok, tmp_path / "h")
    model2, tok2 = load_hart(root)
    assert (model2.cfg, tok2.cfg) == (hcfg, tcfg)
    for a, b in ((model, model2), (tok, tok2)):
        pa, pb = nnx.to_pure_dict(nnx.state(a, nnx.Param)), nnx.to_pure_dict(nnx.state(b, nnx.Param))
        jax.tree.map(np.testing.assert_array_equal, pa, pb)
    m16, t16 = load_hart(root, dtype=jnp.bfloat16)
    assert m16.blocks[0].ffn.up_proj.kernel[...].dtype == t16.decoder.conv_out.kernel[...].dtype == jnp.bfloat16
    assert m16.blocks[0].ln_wo_grad.weight[...].dtype == t16.decoder.norm_out.scale[...].dtype == jnp.float32
    np.testing.assert_array_equal(t16.quantize.codebook, tok.quantize.codebook)  # the quantizer stays float32
    with pytest.raises(FileExistsError):
        save_hart(model, tok, root)
    tok_json = json.loads((root / "tokenizer" / "config.json").read_text())  # what the official code keys on
    assert (tok_json["quantizer_type"], tok_json["hybrid"], tok_json["v_patch_nums"]) == ("var_hybrid", True, [1, 2, 3])
    (root / "tokenizer" / "config.json").write_text(json.dumps(tok_json | {"quantizer_type": "var"}))
    with pytest.raises(ValueError, match="quantizer_type='var'"):
        load_hart(root)


@pytest.fixture(scope="module")
def hart_text(ckpt, model_dir):
    return HART.from_pretrained(ckpt[0], text_encoder=model_dir)


def test_prompts_and_text_encoder_folder_refused_by_name(ckpt, hart_text):
    """A bare str (iterated, it would be one prompt per character), an empty list or a non-str prompt is refused by
    every public entry that takes prompts; so are prompts and context together. The HART folder (or its llm/)
    given as the text encoder is named from its config.json, before transformers' tokenizer error."""
    enc = hart_text.text_encoder
    entries = (hart_text.generate, hart_text.encode, enc, enc.token_inputs, enc.tokenize)
    for entry in entries:
        with pytest.raises(ValueError, match=r"got one str 'a red cat': pass \[prompt\]"):
            entry("a red cat")
        with pytest.raises(ValueError, match="non-empty list of str"):
            entry([])
        with pytest.raises(ValueError, match="prompt 1 is int"):
            entry(["a cat", 3])
    ctx = jnp.zeros((1, CTX_T, CTX_D))
    with pytest.raises(ValueError, match="not both"):
        hart_text.generate(["a cat"], context=ctx)
    with pytest.raises(FileNotFoundError, match="no config.json .*this is a HART checkpoint"):
        TextEncoder.from_pretrained(ckpt[0])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HART.from_pretrained(ckpt[0], text_encoder=ckpt[0])
    with pytest.raises(ValueError, match="model_type 'hart_transformer_t2i'; HART's text encoder is a Qwen2"):
        TextEncoder.from_pretrained(ckpt[0] / "llm")


def test_sample_options_refused_by_name():
    """Out-of-range sampling options name the field and its range at construction; the official meanings stay
    valid (top_k 0 and top_p 0: off, top_p 1: keep all, cfg 0: no guidance, temperature 0: noise-free diffusion)."""
    for ok in (dict(top_k=0, top_k_late=0, top_p=0.0), dict(top_p=1.0, cfg=0.0, temperature=0.0), dict(cfg=7)):
        SampleOptions(**ok)
    # top_k 0 or at / above the vocabulary keeps every token; top_p 1 too
    logits = jax.random.normal(jax.random.key(0), (2, V))
    for k, p in ((0, 0.0), (V, 0.0), (V + 1, 0.0), (0, 1.0)):
        np.testing.assert_array_equal(filter_logits(logits, k, p), logits)
    assert int(jnp.isfinite(filter_logits(logits, V - 1, 0.0)).sum()) == 2 * (V - 1)
    bad = {"top_p": (1.5, -0.1, float("nan")), "cfg": (-1.0, float("inf")), "temperature": (-0.5,),
           "top_k": (-1, 2.5, True), "top_k_late": (-3,), "num_maskgit_iters": (0,)}
    for name, values in bad.items():
        for v in values:
            with pytest.raises(ValueError, match=rf"SampleOptions\.{name} must be"):
                SampleOptions(**{name: v})


def test_one_program_equals_encode_then_generate(hart_text):
    """Prompts go through text encoding + generation + decoding as one compiled program; the same images as
    encoding first and generating from the context."""
    hart = hart_text
    prompts, opts = ["a red cat", "blue sky sky"], SampleOptions(cfg=3.0, top_k=10, top_k_late=5)
    ctx, pos = hart.encode(prompts)
    np.testing.assert_allclose(hart.generate(prompts, seed=2, opts=opts),
                               hart.generate(context=ctx, ctx_pos=pos, seed=2, opts=opts), atol=1e-5)
    # its memory analysis (abstract inputs): batch 1 holds the weights and more; a smaller capacity fits no batch
    n_sys = hart.text_encoder.token_inputs(prompts)[2]
    peak = program_peak_bytes(hart.text_encoder.model, hart.transformer, hart.tokenizer, 1, n_sys, opts)
    parts = (hart.text_encoder.model, hart.transformer, hart.tokenizer)
    assert peak > sum(x.nbytes for x in jax.tree.leaves(nnx.state(parts)))
    assert hart.max_batch(capacity=peak - 1, opts=opts) == 0


def test_hart_1024_with_weights_end_to_end(ckpt, model_dir, tmp_path):
    """`make exp name=hart_1024 ckpt=... text_encoder=...` on the tiny checkpoint and tiny Qwen2."""
    from jaxeff.experiment import run_experiment

    root, _, _ = ckpt
    run = run_experiment("hart_1024", "smoke", {"ckpt": str(root), "text_encoder": str(model_dir),
                                                "prompts": "a red cat,blue sky,a dog", "batch": "2",
                                                "timed_runs": "1"}, runs_root=tmp_path)
    pngs = sorted((run.dir / "images").glob("*.png"))
    assert len(pngs) == 3 and (run.dir / "grid.png").exists()
    text = (run.dir / "results.md").read_text()
    assert "images / s" in text and "TMACs / image" in text


def test_wrong_folder_is_named(tmp_path):
    from jaxeff.hart.loading import resolve_dirs

    with pytest.raises(FileNotFoundError, match=f"{tmp_path} is not a HART checkpoint: expected llm/ and tokenizer/"):
        resolve_dirs(tmp_path)
