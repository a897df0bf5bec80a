"""`HART`: text encoder + AR transformer + residual diffusion + tokenizer decoder as one object.

`HART.from_pretrained("hart-0.7b-1024px", text_encoder="Qwen2-VL-1.5B-Instruct")` loads the released weights;
`generate(prompts, seed=...)` returns images in [0, 1] ([B, H, W, 3]); the multi-scale generation and the decoder
run as one jitted program. Run on CPU only (with random / tiny weights here).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.hart.loading import load_hart
from jaxeff.hart.tokenizer import HARTTokenizer
from jaxeff.hart.transformer import HARTTransformer, SampleOptions, generate_fhat


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
def _generate_images(graphdef, state, context, ctx_pos, key, opts: SampleOptions):
    model, tok = nnx.merge(graphdef, state)
    f_hat = generate_fhat(model, tok.quantize, context, ctx_pos, key, opts)
    return (tok.decode(f_hat) + 1) / 2


@dataclasses.dataclass
class HART:
    transformer: HARTTransformer
    tokenizer: HARTTokenizer
    text_encoder: object | None = None  # jaxeff.hart.text.TextEncoder

    def __post_init__(self):
        t, k = self.transformer.cfg, self.tokenizer.cfg
        if (t.cvae, t.vocab_size, t.patch_nums) != (k.z_channels, k.vocab_size, k.patch_nums):
            raise ValueError(f"transformer (Cvae {t.cvae}, V {t.vocab_size}, scales {t.patch_nums}) and tokenizer "
                             f"(Cvae {k.z_channels}, V {k.vocab_size}, scales {k.patch_nums}) do not match")

    @classmethod
    def from_pretrained(cls, path: str | Path, text_encoder: str | Path | None = None, use_ema: bool = True,
                        max_length: int | None = None) -> HART:
        """`path`: the hart-0.7b-1024px directory (or its llm/); `text_encoder`: a local Qwen2(-VL) directory."""
        model, tok = load_hart(path, use_ema=use_ema)
        enc = None
        if text_encoder is not None:
            from jaxeff.hart.text import TextEncoder

            enc = TextEncoder.from_pretrained(text_encoder, max_length or model.cfg.context_token)
        return cls(model, tok, enc)

    def encode(self, prompts: list[str]):
        if self.text_encoder is None:
            raise ValueError("this HART has no text encoder; pass text_encoder= to from_pretrained or give context")
        ctx, _, pos = self.text_encoder(prompts)
        return ctx, pos

    def generate(self, prompts: list[str] | None = None, *, context=None, ctx_pos=None, seed: int = 0,
                 opts: SampleOptions | None = None):
        """Images [B, H, W, 3] in [0, 1] for prompts (or precomputed context [B, T, D] + positions [B, T])."""
        opts = SampleOptions() if opts is None else opts
        if prompts is not None:
            context, ctx_pos = self.encode(prompts)
        if context is None:
            raise ValueError("give prompts or context")
        cfg = self.transformer.cfg
        if context.shape[1:] != (cfg.context_token, cfg.context_dim):
            raise ValueError(f"context must be [B, {cfg.context_token}, {cfg.context_dim}], got {context.shape}")
        if ctx_pos is None:
            ctx_pos = jnp.broadcast_to(jnp.arange(cfg.context_token, dtype=jnp.int32), context.shape[:2])
        graphdef, state = nnx.split((self.transformer, self.tokenizer))
        return _generate_images(graphdef, state, jnp.asarray(context, jnp.float32), jnp.asarray(ctx_pos),
                                jax.random.key(seed), opts)
