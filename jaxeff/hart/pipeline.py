"""`HART`: text encoder + AR transformer + residual diffusion + tokenizer decoder as one object.

`HART.from_pretrained("hart-0.7b-1024px", text_encoder="Qwen2-VL-1.5B-Instruct", dtype=jnp.bfloat16)` loads the
released weights; `generate(prompts, seed=...)` returns images in [0, 1] ([B, H, W, 3]). Text encoding, the
multi-scale generation and the tokenizer decoder run as one compiled program (`generate_images`); only the
tokenisation runs on the host. Run on CPU only (with random / tiny weights here).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.hart.loading import load_hart
from jaxeff.hart.text import check_prompts, encode_tokens
from jaxeff.hart.tokenizer import HARTTokenizer
from jaxeff.hart.transformer import HARTTransformer, SampleOptions, generate_fhat


@functools.partial(jax.jit, static_argnames=("graphdef", "opts", "n_sys", "implementation", "q_chunk",
                                             "diffusion_chunk", "decode_chunk"))
def generate_images(graphdef, state, inputs, key, opts: SampleOptions, n_sys: int = 0, implementation=None,
                    q_chunk: int | str | None = "auto", diffusion_chunk: int | None = 4096,
                    decode_chunk: int | None = 1):
    """One compiled program: images [B, H, W, 3] in [0, 1].

    graphdef/state = nnx.split((text_encoder_model, transformer, tokenizer)) with `inputs` = (tokens, valid)
    [B, n_sys + T] (`TextEncoder.token_inputs`): text encoding + generation + decoding; or
    nnx.split((transformer, tokenizer)) with `inputs` = (context [B, T, D], positions [B, T]): generation +
    decoding. `implementation` / `q_chunk` / `diffusion_chunk`: as `generate_fhat`; `decode_chunk`: images per
    tokenizer-decoder call (`HARTTokenizer.decode`'s `chunk`). The three chunk sizes bound the peak memory of the
    last scales, the diffusion head and the decoder (see jaxeff/hart/README.md, "Memory"); they do not change
    the numbers beyond float reassociation."""
    parts = nnx.merge(graphdef, state)
    if len(parts) == 3:
        encoder, model, tok = parts
        context, ctx_pos = encode_tokens(encoder, *inputs, n_sys)
    else:
        (model, tok), (context, ctx_pos) = parts, inputs
    f_hat = generate_fhat(model, tok.quantize, context, ctx_pos, key, opts, implementation=implementation,
                          q_chunk=q_chunk, diffusion_chunk=diffusion_chunk)
    return (tok.decode(f_hat, decode_chunk) + 1) / 2


def memory_compiler_options() -> dict:
    """Compiler options for a memory estimate on this backend: on CPU, XLA's memory-optimised scheduler (the
    default CPU scheduler starts independent work early, e.g. every float32 upcast of a bfloat16 weight, and
    reports several GB more than the program needs); nothing elsewhere (GPU / TPU schedule under their memory)."""
    return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"} if jax.default_backend() == "cpu" else {}


def peak_bytes(compiled, resident: int | None = None) -> int:
    """Peak device bytes of a compiled program from XLA's memory analysis: arguments + outputs + temporaries -
    aliased. `resident`: the bytes held on the device anyway (all the weights, read or not), replacing the
    arguments, which count only what the program reads (jit drops unused inputs, e.g. the tokenizer's encoder)."""
    m = compiled.memory_analysis()
    args = m.argument_size_in_bytes if resident is None else resident
    return args + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def program_peak_bytes(encoder, transformer, tokenizer, batch: int, n_sys: int, opts: SampleOptions | None = None,
                       **chunks) -> int:
    """Peak bytes of `generate_images` (text encoder `encoder` = a Qwen2 `Llama`, here possibly abstract from
    nnx.eval_shape) for `batch` prompts of n_sys + context_token tokens, from the program compiled on the default
    backend for abstract inputs (nothing is allocated or run), with every weight of the three modules resident.
    `chunks`: generate_images' chunk options. On CPU it is an estimate for another device
    (`memory_compiler_options`; its attention and buffer assignment differ)."""
    gd, st = nnx.split((encoder, transformer, tokenizer))
    shape = (batch, n_sys + transformer.cfg.context_token)
    inputs = (jax.ShapeDtypeStruct(shape, jnp.int32), jax.ShapeDtypeStruct(shape, jnp.bool_))
    lowered = generate_images.lower(gd, st, inputs, jax.random.key(0), opts or SampleOptions(), n_sys, **chunks)
    resident = sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves((st, inputs)))
    return peak_bytes(lowered.compile(compiler_options=memory_compiler_options()), resident)


def largest_batch(peak_fn, capacity: int, limit: int = 256) -> int:
    """The largest batch b <= limit with peak_fn(b) <= capacity bytes (0 if batch 1 does not fit), assuming the
    peak grows with the batch: each guess extends the line through peak_fn(1) and the last batch tried, kept
    strictly between the largest batch known to fit and the smallest known not to, until they are adjacent (a few
    calls of peak_fn, each a compile)."""
    p1 = peak_fn(1)
    if p1 > capacity:
        return 0
    lo, hi, b = 1, limit + 1, 2
    while hi - lo > 1:
        b = min(max(b, lo + 1), hi - 1)
        p = peak_fn(b)
        if p <= capacity:
            lo = b
        else:
            hi = b
        slope = (p - p1) / (b - 1)
        b = hi - 1 if slope <= 0 else 1 + int((capacity - p1) // slope)
    return lo


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
                        max_length: int | None = None, dtype=jnp.float32) -> HART:
        """`path`: the hart-0.7b-1024px directory (or its llm/); `text_encoder`: a local Qwen2(-VL) directory.
        `dtype`: compute / weight dtype of the transformer, the tokenizer's autoencoder and the text encoder
        (jnp.bfloat16 for speed; norms, softmax statistics and the sampler stay float32, see `load_hart`)."""
        model, tok = load_hart(path, use_ema=use_ema, dtype=dtype)
        enc = None
        if text_encoder is not None:
            from jaxeff.hart.text import TextEncoder

            enc = TextEncoder.from_pretrained(text_encoder, max_length or model.cfg.context_token, dtype=dtype)
        return cls(model, tok, enc)

    def encode(self, prompts: list[str]):
        """prompts (a list of str) -> (context [B, T, D] float32, positions [B, T] int32). Raises ValueError without
        a text encoder or for prompts that are not a non-empty list of str (`jaxeff.hart.text.check_prompts`)."""
        check_prompts(prompts)
        if self.text_encoder is None:
            raise ValueError("this HART has no text encoder; pass text_encoder= to from_pretrained or give context")
        ctx, _, pos = self.text_encoder(prompts)
        return ctx, pos

    def generate(self, prompts: list[str] | None = None, *, context=None, ctx_pos=None, seed: int = 0,
                 opts: SampleOptions | None = None):
        """Images [B, H, W, 3] in [0, 1] for prompts (a list of str, encoded inside the compiled program) or
        precomputed context [B, T, D] + positions [B, T]. Raises ValueError without either or with both, for
        prompts that are not a non-empty list of str (a bare str would be one prompt per character), for a context
        of the wrong shape, or for `opts` the model cannot take (`generate_fhat`)."""
        opts = SampleOptions() if opts is None else opts
        key = jax.random.key(seed)
        if prompts is not None and context is not None:
            raise ValueError("give prompts or context, not both")
        if prompts is not None:
            check_prompts(prompts)
            if self.text_encoder is None:
                raise ValueError("this HART has no text encoder; pass text_encoder= to from_pretrained or give "
                                 "context")
            tokens, valid, n_sys = self.text_encoder.token_inputs(prompts)
            graphdef, state = nnx.split((self.text_encoder.model, self.transformer, self.tokenizer))
            return generate_images(graphdef, state, (jnp.asarray(tokens), jnp.asarray(valid)), key, opts, n_sys)
        if context is None:
            raise ValueError("give prompts or context")
        cfg = self.transformer.cfg
        if context.shape[1:] != (cfg.context_token, cfg.context_dim):
            raise ValueError(f"context must be [B, {cfg.context_token}, {cfg.context_dim}], got {context.shape}")
        if ctx_pos is None:
            ctx_pos = jnp.broadcast_to(jnp.arange(cfg.context_token, dtype=jnp.int32), context.shape[:2])
        graphdef, state = nnx.split((self.transformer, self.tokenizer))
        return generate_images(graphdef, state, (jnp.asarray(context, jnp.float32), jnp.asarray(ctx_pos)), key,
                               opts)

    def max_batch(self, capacity: int | None = None, opts: SampleOptions | None = None, limit: int = 256) -> int:
        """The largest prompt batch (<= limit) whose `generate(prompts)` program fits `capacity` bytes (default: the
        first device's `bytes_limit`), from compiled programs' memory analysis (`largest_batch`: 2-4 compiles,
        nothing run); 0 if batch 1 does not fit. Raises ValueError without a text encoder or when the device
        reports no limit (CPU)."""
        if self.text_encoder is None:
            raise ValueError("max_batch needs a text encoder (it sizes the whole prompts -> images program)")
        if capacity is None:
            capacity = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
            if capacity is None:
                raise ValueError(f"{jax.devices()[0]} reports no memory limit; pass capacity= in bytes")
        n_sys = self.text_encoder.token_inputs([""])[2]
        return largest_batch(lambda b: program_peak_bytes(self.text_encoder.model, self.transformer, self.tokenizer,
                                                          b, n_sys, opts), capacity, limit)
