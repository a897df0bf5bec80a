"""make bench name=nvila: time to first token of one image, NVILA (Dynamic-S2 + 2x2) vs NVILA-Lite (dynamic tiling
+ 3x3) vs a single 448 tile (2x2), same device, one run.

Real tile and token counts (448 tiles of 32x32 patches, the image's Dynamic-S2 / Lite grid), random weights at a
reduced width by default. Per mode: host tiling, tower + projector (`encode_tiles`, jitted), and LLM prefill of
visual + "\\n" + `text` tokens (jitted, logits of the last position), each the best of `repeats` after a warm-up;
ratios are against NVILA. `preset=full` is SigLIP so400m + Qwen2.5-7B widths (GPU/TPU).
Overrides: key=value for vit_width (multiple of 72), vit_mlp, vit_layers, llm_width (multiple of 128), llm_mlp,
llm_layers, text, repeats, width, height, preset.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import best_time, parse_preset
from jaxeff.models.llama import LlamaConfig
from jaxeff.models.vit import ViTConfig
from jaxeff.nvila import tiling
from jaxeff.nvila.model import NVILAConfig, NVILAModel, encode_tiles

PRESETS = {
    "reduced": {"vit_width": 144, "vit_mlp": 576, "vit_layers": 2, "llm_width": 256, "llm_mlp": 1024,
                "llm_layers": 4, "text": 64, "repeats": 3, "width": 1920, "height": 1080},
    # SigLIP so400m (26 of 27 layers run) + Qwen2.5-7B
    "full": {"vit_width": 1152, "vit_mlp": 4304, "vit_layers": 27, "llm_width": 3584, "llm_mlp": 18944,
             "llm_layers": 28, "text": 64, "repeats": 5, "width": 1920, "height": 1080},
}
MODES = (("NVILA (S2, 2x2)", "dynamic_s2", "mlp_downsample"), ("NVILA-Lite (dynamic, 3x3)", "dynamic",
         "mlp_downsample_3x3_fix"), ("one 448 tile (2x2)", "resize", "mlp_downsample"))


def parse(argv):
    opts = parse_preset(argv, PRESETS)
    if opts["vit_width"] % 72 or opts["llm_width"] % 128:
        raise SystemExit("vit_width must be a multiple of 72 and llm_width of 128 (SigLIP / Qwen2 head sizes)")
    return opts


def make_model(o, mode: str, projector: str, dtype) -> NVILAModel:
    vit = ViTConfig(image_size=448, patch_size=14, hidden_size=o["vit_width"], intermediate_size=o["vit_mlp"],
                    num_hidden_layers=o["vit_layers"], num_attention_heads=o["vit_width"] // 72)
    llm_heads = o["llm_width"] // 128
    llm = LlamaConfig(vocab_size=1024, hidden_size=o["llm_width"], intermediate_size=o["llm_mlp"],
                      num_hidden_layers=o["llm_layers"], num_attention_heads=llm_heads,
                      num_key_value_heads=max(1, llm_heads // 7), model_type="qwen2", attention_bias=True,
                      max_position_embeddings=32768)
    cfg = NVILAConfig(vision=vit, llm=llm, projector_type=projector, image_aspect_ratio=mode,
                      mm_hidden_size=vit.hidden_size * (3 if projector == "mlp_downsample" else 1))
    return NVILAModel(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)


def tiles_for(mode: str, image):
    if mode == "dynamic_s2":
        tiles, block = tiling.dynamic_s2_tiles(image)
        return [(tiling.siglip_pixels(tiles), block)]
    if mode == "dynamic":
        return [(tiling.siglip_pixels(tiling.dynamic_tiles(image)[0]), None)]
    return [(tiling.siglip_preprocess(image), None)]


def measure(o, mode: str, projector: str, image, dtype):
    model = make_model(o, mode, projector, dtype)
    t_tile = best_time(tiles_for, mode, image, repeats=o["repeats"])
    batches = tiles_for(mode, image)

    def encode():
        return [encode_tiles(model, p, b) for p, b in batches]

    t_enc = best_time(encode, repeats=o["repeats"])
    feats = encode()
    groups = feats[0].shape[0] if feats[0].ndim == 3 else 1
    visual = sum(int(np.prod(f.shape[:-1])) for f in feats)
    seq = visual + groups * (2 if mode == "dynamic" else 1) + o["text"]  # Lite: "\n" end token + prompt "\n"
    graphdef, state = nnx.split(model.llm)

    def prefill(state, embeds):
        llm = nnx.merge(graphdef, state)
        return llm.logits(llm(None, inputs_embeds=embeds, output="hidden")[:, -1:])

    embeds = jax.random.normal(jax.random.key(0), (1, seq, o["llm_width"]), dtype)
    prefill = jax.jit(prefill)
    t_pre = best_time(prefill, state, embeds, repeats=o["repeats"])
    return sum(len(p) for p, _ in batches), visual, seq, t_tile, t_enc, t_pre


def main(argv):
    o = parse(argv)
    dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    image = np.random.default_rng(0).integers(0, 256, (o["height"], o["width"], 3), dtype=np.uint8)
    rows = [(name, *measure(o, mode, projector, image, dtype)) for name, mode, projector in MODES]
    base = rows[0][4] + rows[0][5] + rows[0][6]
    print(f"Time to first token, {o['width']}x{o['height']} image, tower width {o['vit_width']} x "
          f"{o['vit_layers']} layers, LLM width {o['llm_width']} x {o['llm_layers']} layers, {o['text']} text tokens, "
          f"{jax.default_backend()} ({jax.devices()[0].device_kind}), best of {o['repeats']}")
    print(f"{'mode':<28}{'tiles':>6}{'visual':>8}{'LLM seq':>9}{'tiling s':>10}{'tower+proj s':>14}{'prefill s':>11}"
          f"{'total s':>9}{'NVILA / mode':>14}")
    for name, tiles, visual, seq, a, b, c in rows:
        print(f"{name:<28}{tiles:>6}{visual:>8}{seq:>9}{a:>10.4f}{b:>14.4f}{c:>11.4f}{a + b + c:>9.4f}"
              f"{base / (a + b + c):>14.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
