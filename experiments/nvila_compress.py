"""NVILA's "scale then compress": visual tokens and LLM prefill cost per image and per video.

- Spatial: one Dynamic-S2 image (3x3 tiles at the last scale, the 448^2 case) with 1024 (no compression), 256
  (`mlp_downsample`, 2x2) and 121 (`mlp_downsample_3x3_fix`, NVILA-Lite) tokens per tile.
- Temporal: a video of `frames` frames at 256 tokens each, averaged over 1 / 4 / 8 consecutive frames (TSP).
- Dynamic-S2 / Lite token counts for common image sizes (the grid rule of `jaxeff.nvila.tiling`).
- The SigLIP tower's cost per image (layer -2 of so400m-448: 26 layers run) for 1, 14 and 17 tiles.

FLOPs come from XLA's `cost_analysis()` of the lowered prefill (final-norm hidden states, logits at the last
position only) at the released NVILA-8B / NVILA-Lite-8B LLM size (Qwen2.5-7B: width 3584, 28 layers, 28 / 4
heads, MLP 18944, vocab 151648) with abstract weights (`nnx.eval_shape`, nothing allocated). Measured prefill
times use a reduced LLM (`time_*` fields) with random weights and are reported as ratios.
Paper / code figures: 4x (2x2) and 8.46x (3x3) fewer tokens per tile, 8x over frames, prefill 1.6-2.2x faster.

Multi-process: every process measures the same programs on its own first device (a per-device cost, nothing
sharded), and process 0 writes the run directory. Run on: 1 CPU device.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.experiment import Run, register
from jaxeff.models.llama import Llama, LlamaConfig
from jaxeff.models.vit import ViT, ViTConfig
from jaxeff.nvila.tiling import candidate_grids, closest_grid

QWEN25_7B = dict(vocab_size=151648, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6, max_position_embeddings=32768,
                 model_type="qwen2", attention_bias=True)
SIGLIP_SO400M_448 = ViTConfig(image_size=448, patch_size=14, hidden_size=1152, intermediate_size=4304,
                              num_hidden_layers=27, num_attention_heads=16)
IMAGE_SIZES = ((448, 448), (1920, 1080), (1080, 1920), (640, 480))
TOKENS_PER_TILE = ((1024, "none"), (256, "2x2 (NVILA)"), (121, "3x3 (NVILA-Lite)"))
PAPER = {"2x2 (NVILA)": "4x tokens", "3x3 (NVILA-Lite)": "8.46x tokens", "pool 8": "8x tokens",
         "prefill": "1.6-2.2x (paper)"}


@dataclasses.dataclass(frozen=True)
class Config:
    text_tokens: int = 64  # chat template + question
    image_tiles: int = 9  # last-scale Dynamic-S2 tiles of the spatial rows (3x3: the 448^2 image)
    frames: int = 64
    pools: tuple[int, ...] = (1, 4, 8)
    vit_tiles: tuple[int, ...] = (1, 14, 17)
    llm_scale: str = "8b"  # "8b" (released size, abstract weights) or "tiny" (tests)
    time_hidden: int = 256
    time_layers: int = 4
    time_heads: int = 4
    repeats: int = 3
    timing: bool = True

    def validate(self):
        if self.llm_scale not in ("8b", "tiny"):
            raise ValueError(f"llm_scale must be '8b' or 'tiny', got {self.llm_scale!r}")
        if self.image_tiles < 1 or self.frames < 1 or min(self.pools) < 1:
            raise ValueError("image_tiles, frames and pools must be >= 1")
        if self.time_hidden % self.time_heads:
            raise ValueError(f"time_hidden {self.time_hidden} must be divisible by time_heads {self.time_heads}")


def llm_config(cfg: Config) -> LlamaConfig:
    if cfg.llm_scale == "8b":
        return LlamaConfig(**QWEN25_7B)
    return LlamaConfig(**(QWEN25_7B | dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)))


def _flops(lowered) -> float:
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"])


def _prefill_fn(graphdef):
    def prefill(state, embeds):
        llm = nnx.merge(graphdef, state)
        hidden = llm(None, inputs_embeds=embeds, output="hidden")
        return llm.logits(hidden[:, -1:])

    return prefill


def prefill_flops(llm_cfg: LlamaConfig, seq_len: int, dtype=jnp.bfloat16) -> float:
    """XLA FLOPs of one prefill of `seq_len` positions, abstract weights."""
    model = nnx.eval_shape(lambda: Llama(llm_cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
    graphdef, state = nnx.split(model)
    embeds = jax.ShapeDtypeStruct((1, seq_len, llm_cfg.hidden_size), dtype)
    return _flops(jax.jit(_prefill_fn(graphdef)).lower(state, embeds))


def vit_flops_per_tile(vit_cfg: ViTConfig, select_layer: int = -2, dtype=jnp.bfloat16) -> float:
    model = nnx.eval_shape(lambda: ViT(vit_cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
    graphdef, state = nnx.split(model)
    pixels = jax.ShapeDtypeStruct((1, vit_cfg.image_size, vit_cfg.image_size, 3), dtype)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, select_layer=select_layer))
    return _flops(fn.lower(state, pixels))


def image_token_counts(width: int, height: int) -> dict:
    """Dynamic-S2 (NVILA) and dynamic (Lite) tiles / LLM tokens for one image, "\\n" separators included."""
    cols, rows = closest_grid(width, height, candidate_grids(9, 12))
    lcols, lrows = closest_grid(width, height, candidate_grids(1, 12))
    lite_tiles = lcols * lrows + (lcols * lrows > 1)
    return {"image": f"{width}x{height}", "S2 grid (rows x cols)": f"{rows}x{cols}", "S2 ViT tiles": 5 + rows * cols,
            "S2 LLM tokens": 256 * rows * cols + 1, "Lite grid": f"{lrows}x{lcols}", "Lite tiles": lite_tiles,
            "Lite LLM tokens": lite_tiles * (121 + 2)}  # 121 + "\n" end token + the prompt's "\n" per tile


def _time_prefill(llm_cfg: LlamaConfig, seq_len: int, repeats: int) -> float:
    model = Llama(llm_cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    fn = jax.jit(_prefill_fn(graphdef))
    embeds = jax.random.normal(jax.random.key(0), (1, seq_len, llm_cfg.hidden_size))
    jax.block_until_ready(fn(state, embeds))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(state, embeds))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


@register("nvila_compress", Config, presets={
    "smoke": {"frames": 16, "time_hidden": 128, "time_layers": 2, "repeats": 2},
    "full": {"frames": 256, "repeats": 5},
})
def run(cfg: Config, run: Run) -> None:
    """NVILA token compression: visual tokens and prefill FLOPs (8B, XLA cost analysis), CPU prefill time ratios."""
    llm_cfg = llm_config(cfg)
    time_cfg = LlamaConfig(**(QWEN25_7B | dict(vocab_size=1024, hidden_size=cfg.time_hidden,
                                               intermediate_size=4 * cfg.time_hidden,
                                               num_hidden_layers=cfg.time_layers, num_attention_heads=cfg.time_heads,
                                               num_key_value_heads=cfg.time_heads)))
    cases = [(f"image, {cfg.image_tiles} tiles, {name}", cfg.image_tiles * t + 1, "spatial")
             for t, name in TOKENS_PER_TILE]
    groups = lambda p: -(-cfg.frames // p)
    cases += [(f"video, {cfg.frames} frames, pool {p}", groups(p) * 257, "temporal") for p in cfg.pools]
    rows, measured = [], {}
    for label, visual, kind in run.progress(cases, desc="prefill cost"):
        seq = visual + cfg.text_tokens
        flops = prefill_flops(llm_cfg, seq)
        secs = _time_prefill(time_cfg, seq, cfg.repeats) if cfg.timing else float("nan")
        measured[label] = (kind, visual, flops, secs)
        run.log(len(measured), case=label, visual_tokens=visual, seq_len=seq, prefill_flops=flops, cpu_s=secs)
    for label, (kind, visual, flops, secs) in measured.items():
        base = next(v for k, v in measured.items() if v[0] == kind)
        rows.append({"case": label, "visual tokens": visual, "token ratio": base[1] / visual,
                     "prefill TFLOPs (8B)" if cfg.llm_scale == "8b" else "prefill GFLOPs (tiny)":
                         flops / (1e12 if cfg.llm_scale == "8b" else 1e9),
                     "FLOPs ratio": base[2] / flops, "CPU prefill time ratio": base[3] / secs,
                     "paper": PAPER.get(label.split(", ")[-1], "")})
    device = jax.devices()[0].device_kind
    run.results(rows, title=f"Prefill cost at NVILA-8B's LLM size ({cfg.llm_scale}), {cfg.text_tokens} text tokens",
                note=(f"FLOPs: XLA cost_analysis of the lowered prefill (bf16, abstract weights). CPU time ratios: a "
                      f"{cfg.time_layers}-layer width-{cfg.time_hidden} Qwen2 on {jax.default_backend()} ({device}), "
                      f"median of {cfg.repeats}. Paper: prefill 1.6-2.2x faster (whole system vs baseline); NVILA "
                      f"issue #233 reports no TTFT change from token compression for images."))
    run.results([image_token_counts(w, h) for w, h in IMAGE_SIZES],
                title="Dynamic-S2 (NVILA) and dynamic tiling (NVILA-Lite) per image",
                note="S2: 1 + 4 + rows*cols SigLIP tiles, 256 tokens per last-scale tile + one \"\\n\". Lite: tiles "
                     "(+ thumbnail when > 1), 121 tokens + the \"\\n\" end token + the prompt's \"\\n\" per tile.")
    vit_cfg = SIGLIP_SO400M_448 if cfg.llm_scale == "8b" else ViTConfig(image_size=56, patch_size=14, hidden_size=32,
                                                                         intermediate_size=64, num_hidden_layers=2,
                                                                         num_attention_heads=2)
    per_tile = vit_flops_per_tile(vit_cfg)
    run.results([{"ViT tiles": n, "SigLIP TFLOPs (layer -2)": n * per_tile / 1e12} for n in cfg.vit_tiles],
                title="SigLIP so400m-448 cost per image (tower stopped at layer -2)")
    run.save_json("results.json", {"prefill": measured, "vit_flops_per_tile": per_tile})
