"""make bench name=hart: HART generation vs the matched DiT diffusion baseline, same device, one run.

Random weights at the configured size; both models get the same width / depth / heads, the same dtype and the same
attention front door (`jaxeff.nn.attention`), and classifier-free guidance (doubled batch). Measured, each after a
compile + warm-up call, best of `repeats`:
- HART "new" path (bfloat16 matmuls, float32 norms / softmax statistics / sampler, attention through the front door
  with the backend's default implementation, preallocated KV cache): the AR transformer + residual diffusion
  (`generate_fhat_jit`, text encoder and tokenizer decoder excluded) at batch 1 (seconds per image) and at
  `throughput_batch` (images per second); and the whole user program at batch 1 (`generate_images`: Qwen2 text
  encoder of the given size on random tokens + generation + the bfloat16 tokenizer decoder, one compiled program).
- The tokenizer decoder alone at batch 1 (`HARTTokenizer.decode`), bfloat16 and float32 with the same weights
  (`jaxeff.hart.loading.with_dtype`), and the PSNR of the bfloat16 image against the float32 one.
- HART "old" path (float32, attention as float32 einsums materialising all scores at once, KV cache grown by
  concatenation), same two batch sizes (`old_path=0` skips it).
- DiT: the same-size transformer on an f8 latent for `dit_steps` DDIM steps, same two batch sizes.
Prints each time as it is measured, then the table, the ratios (DiT / HART time, old / new, decoder float32 /
bfloat16), analytic MACs and their ratio. `memory=1` adds the peak
memory per stage (text encoder, AR + diffusion, tokenizer decoder, each with its own weights) and of the whole
1024px program (bfloat16) at batch 1 / 2 / 4 from XLA's `memory_analysis()` of programs compiled on this device
for abstract inputs (nothing allocated), and the largest batch that fits 16 GiB (TPU v5e-1) and 80 GiB (an 80 GB
GPU) (`jaxeff.hart.pipeline.largest_batch`). A CPU-compiled program is only an estimate for another backend: it
upcasts bfloat16 matmuls to float32 and its buffer assignment and attention kernels differ; it is compiled with
XLA's memory-optimised CPU scheduler (`memory_compiler_options`).

Presets: `smoke` (default; tiny, for CPU: timings there are ratios only), `reduced` (a mid-size model, still CPU),
`full` (1024px at the released size with a Qwen2-1.5B-sized text encoder: GPU / TPU). Overrides: key=<int> for
the integer options of the preset (see PRESETS), e.g. `python -m benchmarks.hart preset=full repeats=10`;
`timing=0` skips the timings (memory only), `memory=0` the memory analysis.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import best_time, parse_preset
from jaxeff.hart.dit import DiT, DiTConfig, ddim_sample_jit
from jaxeff.hart.loading import with_dtype
from jaxeff.hart.macs import dit_macs, hart_macs
from jaxeff.hart.pipeline import generate_images, largest_batch, memory_compiler_options, peak_bytes, program_peak_bytes
from jaxeff.hart.text import SYSTEM_PROMPT, encode_tokens
from jaxeff.hart.tokenizer import HARTTokenizer, TokenizerConfig
from jaxeff.hart.train import psnr
from jaxeff.hart.transformer import HARTConfig, HARTTransformer, SampleOptions, generate_fhat, generate_fhat_jit
from jaxeff.models.llama import Llama, LlamaConfig

_QWEN2_1_5B = {"text_layers": 28, "text_hidden": 1536, "text_heads": 12, "text_kv_heads": 2, "text_ffn": 8960,
               "text_vocab": 151936}
_SCALES_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
PRESETS = {
    "smoke": {"width": 64, "depth": 2, "heads": 4, "context": 16, "throughput_batch": 2, "dit_steps": 20,
              "repeats": 2, "scales": (1, 2, 3, 4, 6, 8), "diff_width": 64, "diff_depth": 2, "old_path": 1,
              "memory": 0, "timing": 1, "text_layers": 2, "text_hidden": 64, "text_heads": 4, "text_kv_heads": 2,
              "text_ffn": 128, "text_vocab": 512, "tok_ch": 16, "tok_levels": 5},
    "reduced": {"width": 512, "depth": 8, "heads": 8, "context": 32, "throughput_batch": 4, "dit_steps": 20,
                "repeats": 2, "scales": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), "diff_width": 256, "diff_depth": 3,
                "old_path": 1, "memory": 0, "timing": 1, "text_layers": 4, "text_hidden": 512, "text_heads": 8,
                "text_kv_heads": 2, "text_ffn": 1024, "text_vocab": 4096, "tok_ch": 32, "tok_levels": 5},
    "full": {"width": 1536, "depth": 16, "heads": 24, "context": 300, "throughput_batch": 8, "dit_steps": 20,
             "repeats": 5, "scales": _SCALES_1024, "diff_width": 1024, "diff_depth": 6, "old_path": 1, "memory": 1,
             "timing": 1,
             **_QWEN2_1_5B, "tok_ch": 160, "tok_levels": 5},
}
SYS_TOKENS = len(SYSTEM_PROMPT) // 4  # an estimate of the system prompt's Qwen2 token count (~4 characters a token)
GB = 1e9


def configs(o: dict) -> tuple[HARTConfig, TokenizerConfig, DiTConfig, LlamaConfig]:
    pns = o["scales"]
    hcfg = HARTConfig(embed_dim=o["width"], depth=o["depth"], num_heads=o["heads"], context_token=o["context"],
                      context_dim=o["text_hidden"], patch_nums=pns, diff_width=o["diff_width"],
                      diff_depth=o["diff_depth"])
    mult = (1, 1, 2, 2, 4)[: o["tok_levels"]] if o["tok_ch"] == 160 else (1,) * o["tok_levels"]
    tcfg = TokenizerConfig(patch_nums=pns, ch=o["tok_ch"], ch_mult=mult, norm_groups=min(32, o["tok_ch"]))
    dcfg = DiTConfig(hidden=o["width"], depth=o["depth"], num_heads=o["heads"], latent_size=pns[-1] * 2,
                     context_token=o["context"], context_dim=o["text_hidden"])  # f8 latent of the same image size
    lcfg = LlamaConfig(vocab_size=o["text_vocab"], hidden_size=o["text_hidden"], intermediate_size=o["text_ffn"],
                       num_hidden_layers=o["text_layers"], num_attention_heads=o["text_heads"],
                       num_key_value_heads=o["text_kv_heads"], rope_theta=1e6, attention_bias=True,
                       tie_word_embeddings=True, model_type="qwen2")
    return hcfg, tcfg, dcfg, lcfg


def build(o: dict, dtype, abstract: bool = False):
    """(text encoder, HART transformer, tokenizer, DiT) with random weights in `dtype` (float32 norms, quantizer)."""
    hcfg, tcfg, dcfg, lcfg = configs(o)
    dt = {"dtype": dtype, "param_dtype": dtype}
    make = nnx.eval_shape if abstract else (lambda f: f())
    return (make(lambda: Llama(lcfg, rngs=nnx.Rngs(3), **dt)),
            make(lambda: HARTTransformer(hcfg, rngs=nnx.Rngs(0), **dt)),
            make(lambda: HARTTokenizer(tcfg, rngs=nnx.Rngs(1), **dt)), make(lambda: DiT(dcfg, rngs=nnx.Rngs(2), **dt)))


def inputs(o: dict, b: int):
    """Random context [b, T, D] + positions, random prompt tokens [b, SYS_TOKENS + T] (all valid) and a random
    latent f_hat [b, h, w, Cvae] for the decoder."""
    t, d, pn = o["context"], o["text_hidden"], o["scales"][-1]
    ctx = jax.random.normal(jax.random.key(0), (b, t, d))
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    tokens = jax.random.randint(jax.random.key(1), (b, SYS_TOKENS + t), 0, o["text_vocab"])
    f_hat = jax.random.normal(jax.random.key(2), (b, pn, pn, configs(o)[1].z_channels))
    return ctx, pos, tokens, jnp.ones(tokens.shape, bool), f_hat


def memory_rows(o: dict, batches=(1, 2, 4)) -> tuple[list[dict], dict]:
    """Peak GB of each stage of the bfloat16 program (each with its own weights) and of the whole program
    (`program_peak_bytes`: text encoder, AR + diffusion, decoder as one program, default chunk options) at
    `batches`, from memory_analysis() of programs compiled on this device for abstract inputs (nothing allocated;
    on CPU with `memory_compiler_options`), and the largest batch for 16 GiB / 80 GiB (`largest_batch`)."""
    enc, model, tok, _ = build(o, jnp.bfloat16, abstract=True)
    (ge, se), (gm, sm), (gt, stt) = nnx.split(enc), nnx.split((model, tok.quantize)), nnx.split(tok)
    key = jax.random.key(0)

    def stage(fn, *args):
        return peak_bytes(jax.jit(fn).lower(*args).compile(compiler_options=memory_compiler_options())) / GB

    whole = functools.cache(lambda b: program_peak_bytes(enc, model, tok, b, SYS_TOKENS))
    rows = []
    for b in batches:
        ctx, pos, tokens, valid, f_hat = jax.eval_shape(lambda b=b: inputs(o, b))
        rows.append({
            "batch": b,
            "text encoder": stage(lambda s, t, v: encode_tokens(nnx.merge(ge, s), t, v, SYS_TOKENS), se, tokens,
                                  valid),
            "AR + diffusion": stage(lambda s, c, p: generate_fhat(*nnx.merge(gm, s), c, p, key, SampleOptions()), sm,
                                    ctx, pos),
            "decoder": stage(lambda s, f: nnx.merge(gt, s).decode(f, 1), stt, f_hat),
            "whole program": whole(b) / GB})
        print(f"  memory at batch {b}, GB: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items() if k != "batch"),
              flush=True)
    fits = {name: largest_batch(whole, cap) for name, cap in (("TPU v5e-1, 16 GiB", 16 * 2**30),
                                                               ("GPU, 80 GiB", 80 * 2**30))}
    return rows, fits


def timings(o: dict):
    """Time the programs (module docstring) and print the table and ratios."""
    hcfg, _, dcfg, lcfg = configs(o)
    bt, reps, steps = o["throughput_batch"], o["repeats"], o["dit_steps"]
    opts, key = SampleOptions(cfg=4.5), jax.random.key(1)
    enc, model, tok, dit = build(o, jnp.bfloat16)
    hart_new = nnx.split((model, tok.quantize))
    whole = nnx.split((enc, model, tok))
    dit_g, dit_s = nnx.split(dit)
    decode = jax.jit(lambda g, s, f: nnx.merge(g, s).decode(f, 1), static_argnums=0)
    tok16, tok32 = nnx.split(tok), nnx.split(with_dtype(tok, jnp.float32))  # the same (bf16-exact) weights

    def new(ctx, pos, tokens, valid, f_hat):
        return generate_fhat_jit(*hart_new, ctx, pos, key, opts)

    def whole_program(ctx, pos, tokens, valid, f_hat):
        return generate_images(*whole, (tokens, valid), key, opts, SYS_TOKENS)

    def dit_sample(ctx, pos, tokens, valid, f_hat):
        return ddim_sample_jit(dit_g, dit_s, ctx, key, steps=steps)

    programs = {"new": new, "whole": whole_program, "dit": dit_sample,
                "dec": lambda *a: decode(*tok16, a[-1]), "dec32": lambda *a: decode(*tok32, a[-1])}
    if o["old_path"]:  # float32 weights, float32 einsum attention, concatenated cache
        m32 = nnx.split((HARTTransformer(hcfg, rngs=nnx.Rngs(0)), tok.quantize))

        def old(ctx, pos, tokens, valid, f_hat):
            return generate_fhat_jit(*m32, ctx, pos, key, opts, cache="concat", implementation="xla", q_chunk=None)

        programs["old"] = old
    rows, times = [], {}
    for b in (1, bt):
        args = inputs(o, b)
        for name, fn in programs.items():
            if name in ("new", "dit", "old") or b == 1:  # whole program and decoders at batch 1 only
                times[name, b] = best_time(fn, *args, repeats=reps) / b
                print(f"  {name} batch {b}: {times[name, b]:.4f} s / image", flush=True)
    f_hat = inputs(o, 1)[-1]
    dec_psnr = psnr(decode(*tok16, f_hat), decode(*tok32, f_hat))
    m_h, m_d = hart_macs(hcfg)["total"], dit_macs(dcfg, steps=steps)["total"]
    labels = {"new": "HART (bf16, front door, prealloc cache)", "whole": "HART whole program (text + gen + decode)",
              "old": "HART old path (fp32 einsum, concat cache)", "dit": f"DiT ({steps} steps, bf16)",
              "dec": "tokenizer decoder (bf16)", "dec32": "tokenizer decoder (fp32)"}
    for name, label in labels.items():
        if (name, 1) not in times:
            continue
        tb = times.get((name, bt))
        rows.append((label, times[name, 1], None if tb is None else 1 / tb))
    dev = jax.devices()[0]
    print(f"HART vs DiT: {hcfg.patch_nums[-1] * 16}px, width {o['width']}, depth {o['depth']}, heads {o['heads']}, "
          f"{o['context']} text tokens, CFG 4.5 (doubled batch); text encoder {lcfg.num_hidden_layers} layers x "
          f"{lcfg.hidden_size} on {SYS_TOKENS}+{o['context']} tokens; device {dev.platform} / {dev.device_kind}")
    print(f"{'program':<44}{'s / image (batch 1)':>21}{f'images / s (batch {bt})':>22}")
    for label, t1, ips in rows:
        print(f"{label:<44}{t1:>21.4f}{'' if ips is None else f'{ips:.3f}':>22}")
    print(f"DiT / HART time (AR + diffusion, text encoder and decoder excluded): batch 1 "
          f"{times['dit', 1] / times['new', 1]:.2f}x, batch {bt} {times['dit', bt] / times['new', bt]:.2f}x")
    print(f"text encoder + decoder share of the whole program at batch 1: "
          f"{1 - times['new', 1] / times['whole', 1]:.1%}")
    if o["old_path"]:
        print(f"old / new HART path time: batch 1 {times['old', 1] / times['new', 1]:.2f}x, batch {bt} "
              f"{times['old', bt] / times['new', bt]:.2f}x")
    print(f"tokenizer decoder fp32 / bf16 time at batch 1: {times['dec32', 1] / times['dec', 1]:.2f}x; PSNR of the "
          f"bf16 image against the fp32 one (same latent and weights): {dec_psnr:.1f} dB")
    print(f"analytic MACs per image (CFG, text encoder and decoders excluded): HART {m_h / 1e9:.1f} G, DiT "
          f"{m_d / 1e9:.1f} G, DiT / HART {m_d / m_h:.2f}x")


def main(argv):
    o = parse_preset(argv, PRESETS, default="smoke")
    if o["timing"]:
        timings(o)
    if o["memory"]:
        dev = jax.devices()[0]
        rows, fits = memory_rows(o)
        print(f"peak memory, GB (memory_analysis of the bf16 programs compiled for {dev.platform}, abstract inputs; "
              "each stage with its own weights):")
        print("".join(f"{k:>16}" for k in rows[0]))
        for r in rows:
            print(f"{r['batch']:>16}" + "".join(f"{v:>16.2f}" for k, v in r.items() if k != "batch"))
        print("largest batch of the whole program: " + ", ".join(f"{k}: {v}" for k, v in fits.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
