"""NVILA: SigLIP layer -2 vs transformers, area interpolation vs torch, and a tiny checkpoint written here in the
released layout (config.json, llm/, vision_tower/, mm_projector/) that loads, frames its prompt and generates.
The reference-stack tests skip where torch / transformers are not installed (the Python 3.13 CI leg)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.io import save_file
from jaxeff.io.hf import save_pretrained
from jaxeff.models.llama import LlamaConfig
from jaxeff.models.vit import ViT
from jaxeff.nvila import features as F
from jaxeff.nvila import model as M
from jaxeff.nvila.projector import make_projector, projector_state_dict


def _siglip_torch(image_size, hidden=32, layers=3, seed=0):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    SiglipVisionConfig, SiglipVisionModel = transformers.SiglipVisionConfig, transformers.SiglipVisionModel

    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(image_size=image_size, patch_size=14, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=2, vision_use_head=False)
    model = SiglipVisionModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm affines and position embeddings
        for name, p in model.named_parameters():
            if "norm" in name or "position" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def test_siglip_layer_minus_2_matches_transformers():
    tm = _siglip_torch(56)
    import torch

    vit = nnx.eval_shape(lambda: ViT(M.siglip_config(tm.config.to_dict()), rngs=nnx.Rngs(0)))
    M.load_siglip_state(vit, {k: v.numpy() for k, v in tm.state_dict().items()})
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 56, 56)).astype(np.float32)
    with torch.no_grad():
        out = tm(pixel_values=torch.from_numpy(x), output_hidden_states=True)
    pix = jnp.asarray(x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(vit(pix, select_layer=-2)), out.hidden_states[-2].numpy(), atol=2e-5)
    np.testing.assert_allclose(np.asarray(vit(pix)), out.last_hidden_state.numpy(), atol=2e-5)
    with pytest.raises(ValueError, match=r"missing keys: \[.post_layernorm.weight.\]"):
        sd = {k: v.numpy() for k, v in tm.state_dict().items() if not k.endswith("post_layernorm.weight")}
        M.load_siglip_state(vit, sd)


@pytest.mark.parametrize("in_hw,out_hw", [((7, 5), (3, 4)), ((32, 32), (64, 160)), ((13, 9), (20, 6)),
                                          ((11, 17), (11, 5))])
def test_area_resize_matches_torch_interpolate(in_hw, out_hw):
    torch = pytest.importorskip("torch")
    tF = torch.nn.functional
    x = np.random.default_rng(1).standard_normal((2, 3, *in_hw)).astype(np.float32)
    want = tF.interpolate(torch.from_numpy(x), size=out_hw, mode="area").numpy()
    got = F.area_resize(jnp.asarray(x.transpose(0, 2, 3, 1)), out_hw)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=1e-6)


def _byte_tokenizer():
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])


def write_tiny_nvila(root, lite: bool, video_pool: int = 1):
    """A random tiny NVILA (or NVILA-Lite) in the released layout."""
    tokenizer = _byte_tokenizer()
    vocab = len(tokenizer)  # 258: bytes + <|im_start|>, <|im_end|>; media tokens come after
    llm_cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, model_type="qwen2", attention_bias=True,
                          max_position_embeddings=8192, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                          initializer_range=0.2)
    from jaxeff.models.llama import Llama

    save_pretrained(Llama(llm_cfg, rngs=nnx.Rngs(1)), root / "llm")
    tokenizer.save_pretrained(root / "llm")
    # 56-pixel tiles (4x4 patches) and S2 scales 56/112/168 keep the test fast; the rules are the 448 ones
    _siglip_torch(56, hidden=16, layers=2).save_pretrained(root / "vision_tower")
    kind = "mlp_downsample_3x3_fix" if lite else "mlp_downsample"
    mm_hidden = 16 if lite else 48
    proj = make_projector(kind, mm_hidden, 32, grid=4, rngs=nnx.Rngs(2))
    (root / "mm_projector").mkdir()
    save_file(projector_state_dict(proj), root / "mm_projector" / "model.safetensors")
    (root / "mm_projector" / "config.json").write_text(json.dumps({"mm_projector_type": kind,
                                                                   "model_type": "v2l_projector"}))
    top = {"model_type": "llava_llama", "mm_hidden_size": mm_hidden, "hidden_size": 32, "mm_vision_select_layer": -2,
           "mm_vision_select_feature": "cls_patch", "image_aspect_ratio": "dynamic" if lite else "dynamic_s2",
           "dynamic_s2": not lite, "s2_scales": "56,112,168", "max_tiles": 12}
    if video_pool > 1:
        top["video_encoder"] = {"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[video_pool, 1, 1]]}
    (root / "config.json").write_text(json.dumps(top))
    return root


@pytest.fixture(scope="module")
def tiny_nvila(tmp_path_factory):
    return M.from_pretrained(write_tiny_nvila(tmp_path_factory.mktemp("nvila"), lite=False, video_pool=8),
                             dtype=jnp.float32)


def _image(w, h, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_tiny_nvila_dynamic_s2_framing_and_generation(tiny_nvila):
    m = tiny_nvila
    assert m.config.image_aspect_ratio == "dynamic_s2" and m.config.channel_repeat == 3
    assert m.media_ids[M.IMAGE_TOKEN] >= m.config.llm.vocab_size  # beyond the embedding table
    p = m.build_prompt("What is it?", [_image(640, 480)])
    assert p.kinds.count("image") == 12 * 4 and p.kinds.count("end") == 1  # 3x4 grid, 2x2 tokens per tile
    first_image = p.kinds.index("image")
    assert p.kinds[first_image + 48] == "end"
    ids = m.tokenizer(m.chat_text("<image>What is it?"), add_special_tokens=False).input_ids
    text_ids = [i for i in ids if i != m.media_ids[M.IMAGE_TOKEN]]
    assert ids.index(m.media_ids[M.IMAGE_TOKEN]) == first_image  # the image sits where its token was
    np.testing.assert_array_equal(np.asarray(p.embeds[0][np.array(p.kinds) == "text"]),
                                  np.asarray(m.model.llm.embed_tokens(jnp.asarray(text_ids))))
    # two images: one tile each, 4 tokens + "\n" each
    p2 = m.build_prompt("Compare.", [_image(300, 200), _image(200, 300, seed=1)])
    assert p2.kinds.count("image") == 8 and p2.kinds.count("end") == 2
    ids = m.generate_ids(p, max_new_tokens=4)
    assert 1 <= len(ids) <= 4 and (ids < m.config.llm.vocab_size).all()
    logits = m.model.llm(None, inputs_embeds=p.embeds)  # greedy first token = argmax of the full forward
    assert ids[0] == int(jnp.argmax(logits[0, -1]))
    assert m.generate(_image(640, 480), "What is it?", max_new_tokens=4) == m.tokenizer.decode(
        ids, skip_special_tokens=True).strip()
    assert m.chat_text("hi") == M.CHAT_TEMPLATE.format(content="hi")  # no saved template: VILA's qwen2 one


def test_tiny_nvila_media_tokens_and_errors(tiny_nvila):
    m = tiny_nvila
    with pytest.raises(ValueError, match="beyond the embedding table"):
        m.build_prompt("look: <vila/sentinel>")
    with pytest.raises(ValueError, match="media tokens"):
        m.build_prompt("<image> but no image")
    with pytest.raises(ValueError, match="images or a video"):
        m.build_prompt("x", [_image(64, 64)], video=np.zeros((2, 64, 64, 3), np.uint8))


def test_tiny_nvila_stop_ids_keep_every_config_eos(tiny_nvila):
    import dataclasses
    from types import SimpleNamespace

    m = tiny_nvila
    im_end = m.tokenizer.convert_tokens_to_ids("<|im_end|>")
    llm = dataclasses.replace(m.config.llm, eos_token_id=(5, 7, 10**6))  # a list in config.json; 10**6 > vocab
    view = SimpleNamespace(tokenizer=m.tokenizer, config=dataclasses.replace(m.config, llm=llm))
    assert M.NVILA.stop_ids(view) == (im_end, 5, 7)


def test_save_pretrained_round_trip_and_offline_hub_error(tiny_nvila, tmp_path, monkeypatch):
    m = tiny_nvila
    back = M.from_pretrained(M.save_pretrained(m, tmp_path / "copy"), dtype=jnp.float32)
    assert back.config == m.config and back.media_ids == m.media_ids
    image = _image(200, 120, seed=3)
    a, b = m.build_prompt("Colour?", [image]), back.build_prompt("Colour?", [image])
    assert a.kinds == b.kinds
    np.testing.assert_array_equal(np.asarray(a.embeds), np.asarray(b.embeds))
    np.testing.assert_array_equal(m.generate_ids(a, 3), back.generate_ids(b, 3))
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="could not download 'hf:Efficient-Large-Model/NVILA-Lite-2B'"):
        M.from_pretrained("hf:Efficient-Large-Model/NVILA-Lite-2B")


def test_shared_generate_from_embeddings_equals_token_prompts():
    """The path NVILA decodes with: `llama.generate(inputs_embeds=...)` gives the token path's output for the same
    prompts (rows of different lengths via prompt_lens, several stop ids)."""
    from jaxeff.models.llama import Llama, SamplingConfig, generate

    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, model_type="qwen2", attention_bias=True,
                      initializer_range=0.3)
    llm = Llama(cfg, rngs=nnx.Rngs(3))
    prompts = [[3, 9, 4, 1, 7, 2, 8], [5, 6, 30]]
    for sampling in (SamplingConfig(), SamplingConfig(temperature=0.8, top_k=5)):
        ref = generate(llm, prompts, 9, eos_id=(11, 12), sampling=sampling, seed=4)
        padded = np.zeros((2, 7), np.int32)
        padded[1, :3] = prompts[1]
        padded[0] = prompts[0]
        embeds = llm.embed_tokens(jnp.asarray(padded))
        out = generate(llm, None, 9, inputs_embeds=embeds, prompt_lens=[7, 3], eos_id=(11, 12), sampling=sampling,
                       seed=4)
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        np.testing.assert_array_equal(out.num_generated, ref.num_generated)
    with pytest.raises(ValueError, match="exactly one of prompts"):
        generate(llm, prompts, 2, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="prompt_lens must give"):
        generate(llm, None, 2, inputs_embeds=embeds, prompt_lens=[8, 3])
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[B, S >= 1, 32\]"):
        generate(llm, None, 2, inputs_embeds=embeds[..., :16])


def test_tiny_nvila_video_temporal_pooling(tiny_nvila):
    m = tiny_nvila
    frames = np.stack([_image(96, 64, seed=s) for s in range(10)])  # 8 + 2 frames, pool 8
    p = m.build_prompt("What happens?", video=frames)
    assert p.kinds.count("video") == 2 * 4 and p.kinds.count("end") == 2
    per_frame = m.encode_tiles(np.concatenate([M.tiling.siglip_preprocess(f, 56) for f in frames]))
    start = p.kinds.index("video")
    np.testing.assert_allclose(np.asarray(p.embeds[0, start:start + 4]), np.asarray(per_frame[:8].mean(0)),
                               atol=1e-5)
    second = start + 5  # after the first group's "\n": the short last group averages its 2 real frames
    np.testing.assert_allclose(np.asarray(p.embeds[0, second:second + 4]), np.asarray(per_frame[8:].mean(0)),
                               atol=1e-5)


def test_tiny_nvila_lite_tiles_and_generation(tmp_path):
    m = M.from_pretrained(write_tiny_nvila(tmp_path, lite=True), dtype=jnp.float32)
    assert m.config.image_aspect_ratio == "dynamic" and m.config.projector_type == "mlp_downsample_3x3_fix"
    p = m.build_prompt("Describe.", [_image(112, 56)])  # 1x2 grid + thumbnail = 3 tiles
    assert p.kinds.count("image") == 3 * 4 and p.kinds.count("end") == 3  # 4x4 -> pad 6x6 -> 2x2 per tile
    newline = m.end_ids[0]
    text_ids = m.tokenizer(m.chat_text("<image>\n" * 3 + "Describe."),
                           add_special_tokens=False).input_ids
    assert sum(i == newline for i in text_ids) >= 3  # the rewritten prompt's literal "\n" per tile
    ids = m.generate_ids(p, max_new_tokens=3)
    assert (ids < m.config.llm.vocab_size).all()
    jax.block_until_ready(p.embeds)


def test_nvila_compress_experiment_tiny(tmp_path):
    from experiments.nvila_compress import image_token_counts
    from jaxeff.experiment import run_experiment

    assert image_token_counts(1920, 1080)["S2 LLM tokens"] == 3072 + 1  # the golden table: 3x4 grid
    assert image_token_counts(1080, 1920)["Lite tiles"] == 9
    run = run_experiment("nvila_compress", "smoke", {"llm_scale": "tiny", "timing": "false", "frames": "8"},
                         runs_root=tmp_path)
    res = json.loads((run.dir / "results.json").read_text())["prefill"]
    visual = {k: v[1] for k, v in res.items()}
    assert visual["image, 9 tiles, none"] == 9 * 1024 + 1 and visual["image, 9 tiles, 3x3 (NVILA-Lite)"] == 9 * 121 + 1
    assert visual["video, 8 frames, pool 8"] == 257
    flops = {k: v[2] for k, v in res.items()}
    assert flops["image, 9 tiles, none"] > 4 * flops["image, 9 tiles, 2x2 (NVILA)"] > 0


def test_fp8_linear_close_to_bf16_with_finite_gradients():
    from jaxeff.nvila.fp8 import E4M3, enable_fp8, fp8_matmul, quantize

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 40, 96)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((96, 72)) / 10, jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((3, 40, 72)), jnp.float32)
    rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
    ref = lambda x, w: jnp.sum((x @ w).astype(jnp.float32) * g)
    fp8 = lambda x, w: jnp.sum(fp8_matmul(x, w).astype(jnp.float32) * g)
    assert fp8_matmul(x, w).dtype == jnp.bfloat16
    assert 1e-4 < rel(fp8_matmul(x, w), x @ w) < 0.06  # quantised (not a plain bf16 matmul), yet close
    (dx, dw), (rx, rw) = jax.grad(fp8, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    assert all(bool(jnp.isfinite(a.astype(jnp.float32)).all()) for a in (dx, dw))
    assert rel(dx, rx) < 0.1 and rel(dw, rw) < 0.1
    q, s = quantize(jnp.zeros((4,)), E4M3)  # all-zero tensor: scale 1, no NaN
    assert float(s) == 1.0 and not bool(jnp.isnan(q.astype(jnp.float32)).any())

    from jaxeff.models.llama import Llama

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, model_type="qwen2", attention_bias=True)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.arange(8)[None]
    forward = nnx.jit(lambda m: m(tokens))
    before = forward(model)
    swapped = enable_fp8(model, min_features=32)  # k/v (32 -> 16) stay in high precision, as officially
    assert sorted(swapped) == sorted(f"layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.o_proj",
                                                               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    assert rel(forward(model), before) < 0.1
    grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(tokens) ** 2)))(model)
    assert all(bool(jnp.isfinite(v).all()) for v in jax.tree.leaves(grads))
