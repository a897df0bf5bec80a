"""`Engine(model, config, retrieval_heads=...).generate(prompts, max_new_tokens)`: LServe on the shared decoder.

A batch of prompts of different lengths is right-padded into aligned chunks (padding sits at position -1 and is
never stored); each chunk is one jitted prefill call (compiled once per chunk offset, since the block-sparse
prefill kernel's schedule is static) that computes logits at the last prompt token only; then the streaming
pools shrink to the decode window (`LServeCache.to_decode`) and the whole decode runs as one jitted `lax.scan`,
page lists reselected as `LServeCache` describes. Greedy decoding.

Kernels: with `LServeConfig.implementation=None` a GPU runs the prefill through `hybrid_attention`'s GPU path
(cuDNN for dense heads and the Triton-style Pallas kernel for streaming heads when a chunk starts at 0, the Pallas
kernel otherwise) and the decode through the flash-decoding Pallas kernel (`sparse_paged_decode`); a TPU runs the
Mosaic kernels; a CPU the XLA paths. Executed on CPU only: the GPU path has not run end to end (the kernels it
calls ran on an H200 on their own, see pallas_kernels/sparse_decode.py).

Tensor parallel: on a model placed by `jaxeff.models.sharding.shard_model` the cache is built in its shards
(`LServeCache.partition_specs`) and the model runs under GSPMD; the paged decode kernels of pools split by heads and
a prefill whose streaming flags are the same on every device (always so for the default dense prefill) run per
device under `jax.shard_map`; a replicated pool's kernel runs whole on every device. Tested on 8 CPU devices (XLA
kernels; the TPU Pallas kernels in interpret mode in a one-off check, jaxeff/lserve/README.md); not run on
accelerators.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.duo_attention import check_head_mask
from jaxeff.lserve.cache import LServeCache
from jaxeff.lserve.config import LServeConfig
from jaxeff.models import sharding
from jaxeff.models.llama import CONFIG_EOS, is_stop, num_generated, pad_prompts, resolve_stop_ids


@dataclasses.dataclass
class LServeOutput:
    tokens: np.ndarray  # [B, max_new_tokens]; after a stop id: pad_id
    num_generated: np.ndarray  # [B], the stop id included
    stats: list[dict]  # per request
    kv_nbytes: int  # stored K/V bytes of both page pools after the prompt (min/max statistics excluded)
    dense_kv_nbytes: int  # the same for a dense cache of the same batch, max_len and dtype


class _Unset:
    """An argument not given (`streaming_heads=None` is a given value: no streaming head)."""

    def __repr__(self) -> str:
        return "<not given>"


_UNSET = _Unset()


def _streaming_mask(streaming_heads, retrieval_heads, shape: tuple[int, int]) -> np.ndarray:
    """`Engine`'s head split as the streaming mask bool [layers, kv_heads] (True = streaming head)."""
    given = {name: value for name, value in (("retrieval_heads", retrieval_heads),
                                             ("streaming_heads", streaming_heads)) if value is not _UNSET}
    if len(given) != 1:
        raise TypeError(f"Engine takes exactly one of retrieval_heads= (True = retrieval head, as "
                        f"jaxeff.duo_attention.select_retrieval_heads returns) or streaming_heads= (True = streaming "
                        f"head), both bool [layers, kv_heads] = {shape}; got "
                        f"{' and '.join(given) if given else 'neither'}")
    (name, value), = given.items()
    if name == "streaming_heads" and value is None:
        return np.zeros(shape, bool)
    mask = check_head_mask(value, name, shape, streaming=name == "streaming_heads")
    return ~mask if name == "retrieval_heads" else mask


@partial(jax.jit, static_argnames=("graphdef",))
def _prefill_chunk(graphdef, state, cache, tokens, positions, last_index):
    """Logits at each row's `last_index` in this chunk (clipped) only: a 32K-token chunk's full logits would
    take [32K, vocab] floats."""
    model = nnx.merge(graphdef, state)
    hidden, cache = model(tokens, positions, cache=cache, output="hidden")
    idx = jnp.clip(last_index, 0, tokens.shape[1] - 1)
    return model.logits(jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]), cache


@partial(jax.jit, static_argnames=("graphdef", "steps", "pad_id"))
def _decode(graphdef, state, cache, first, start_pos, stop_ids, *, steps, pad_id):
    model = nnx.merge(graphdef, state)

    def step(carry, _):
        cache, token, pos, done = carry
        logits, cache = model(token[:, None], pos[:, None], cache=cache)
        nxt = jnp.where(done, pad_id, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32))
        return (cache, nxt, pos + 1, done | is_stop(nxt, stop_ids)), nxt

    done = is_stop(first, stop_ids)
    (cache, _, _, _), rest = jax.lax.scan(step, (cache, first, start_pos, done), None, length=steps)
    return rest.T, cache


class Engine:
    """LServe serving engine for a `jaxeff.models.llama.Llama`.

    The head split: pass exactly one of (neither or both: TypeError)
      retrieval_heads: bool [layers, kv_heads], True = retrieval head (every page kept, page selection in decode),
        the convention of `jaxeff.duo_attention.select_retrieval_heads(alpha, sparsity)` and
        `jaxeff.duo_attention.generate(retrieval_heads=...)`: pass a DuoAttention selection as it is;
      streaming_heads: bool [layers, kv_heads], True = streaming head (sink + local window), i.e.
        `~retrieval_heads`; None = no streaming head (every head a retrieval head).
    Both are keyword-only: a positional mask could be read with the wrong convention.
    ValueError when the split is not a bool array of shape (layers, kv_heads) of this model (alpha passed in place
    of a selection, a pattern of another model, `retrieval_heads=None`) or the model has sliding-window layers.
    `model` may be placed on a mesh by `jaxeff.models.sharding.shard_model` (module docstring: tensor parallel).
    """

    def __init__(self, model, config: LServeConfig | None = None, *, streaming_heads=_UNSET,
                 retrieval_heads=_UNSET):
        config = LServeConfig() if config is None else config
        mc = model.config
        self.streaming_heads = _streaming_mask(streaming_heads, retrieval_heads,
                                               (mc.num_hidden_layers, mc.num_key_value_heads))
        if any(w is not None for w in mc.layer_windows):
            raise ValueError(f"LServe Engine does not support sliding-window attention (sliding_window="
                             f"{mc.sliding_window} on layers {mc.layer_windows})")
        self.model, self.config = model, config
        self.graphdef, self.state = nnx.split(model)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                 eos_id: int | Sequence[int] | None | str = CONFIG_EOS, pad_id: int = 0) -> LServeOutput:
        """Greedy tokens [B, max_new_tokens]. eos_id: `CONFIG_EOS` (the default) stops at the checkpoint's ids
        (`generation_stop_ids(model.config)`: generation_config.json's `eos_token_id`, else config.json's, as
        transformers' `generate`); None never stops; one id or several replace them (`jaxeff.models.llama.
        resolve_stop_ids`, the rule of every generate loop). A row stops after the first stop id it generates and
        is `pad_id` after it. ValueError when prompt + new tokens exceed `LServeConfig.max_len`."""
        cfg, mc = self.config, self.model.config
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        stops = resolve_stop_ids(mc, eos_id)
        tokens, lengths = pad_prompts(prompts, pad_id, vocab_size=mc.vocab_size)
        longest = int(lengths.max())
        if longest + max_new_tokens > cfg.max_len:
            raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens is longer than the cache "
                             f"(LServeConfig.max_len = {cfg.max_len})")
        b = len(prompts)
        chunk = min(cfg.prefill_chunk, tokens.shape[1])
        n_chunks = -(-longest // chunk)
        tokens = np.pad(tokens, ((0, 0), (0, n_chunks * chunk - tokens.shape[1])), constant_values=pad_id)
        ar = np.arange(tokens.shape[1])[None]
        positions = np.where(ar < lengths[:, None], ar, -1).astype(np.int32)
        # a model placed by `jaxeff.models.sharding.shard_model`: the cache is built in its shards (partition_specs)
        mesh, axis = sharding.model_mesh(self.model) or (None, "model")
        cache = sharding.init_cache(lambda: LServeCache.init(
            self.streaming_heads, b, mc.head_dim, cfg, dtype=self.model.dtype,
            group=mc.num_attention_heads // mc.num_key_value_heads, prefill_chunks=n_chunks, mesh=mesh,
            mesh_axis=axis), self.model)

        t0 = time.perf_counter()
        first_logits = None
        for c in range(n_chunks):
            sl = slice(c * chunk, (c + 1) * chunk)
            last = jnp.asarray(lengths - 1 - c * chunk)
            logits, cache = _prefill_chunk(self.graphdef, self.state, cache.replace(prefill_offset=c * chunk),
                                           jnp.asarray(tokens[:, sl]), jnp.asarray(positions[:, sl]), last)
            here = ((last >= 0) & (last < chunk))[:, None]
            first_logits = logits if first_logits is None else jnp.where(here, logits, first_logits)
        first = jnp.argmax(first_logits, axis=-1).astype(jnp.int32).block_until_ready()
        cache = cache.to_decode()
        jax.block_until_ready(cache.streaming_pools)
        t1 = time.perf_counter()
        kv_nbytes = cache.kv_nbytes()
        out = [np.asarray(first)[:, None]]
        steps = max_new_tokens - 1
        if steps:
            rest, cache = _decode(self.graphdef, self.state, cache, first, jnp.asarray(lengths),
                                  jnp.asarray(stops, jnp.int32), steps=steps, pad_id=pad_id)
            out.append(np.asarray(rest))
        t2 = time.perf_counter()
        out = np.concatenate(out, axis=1)
        item = jnp.dtype(self.model.dtype).itemsize
        dense = 2 * b * cfg.max_len * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * item
        return LServeOutput(out, num_generated(out, stops), self._stats(cache, lengths, steps, t1 - t0, t2 - t1),
                            kv_nbytes, dense)

    def _stats(self, cache: LServeCache, lengths, steps: int, prefill_s: float, decode_s: float) -> list[dict]:
        """Per request: KV bytes read per decode step (distinct pages per KV head + statistics) next to a dense
        cache's, and the batch's prefill / decode wall times."""
        cfg, mc = self.config, self.model.config
        item = jnp.dtype(self.model.dtype).itemsize
        page_bytes = 2 * cfg.page_size * mc.head_dim * item  # one head's K and V page
        stat_bytes = 2 * mc.head_dim * item  # one head's min and max of one logical page
        pages, stats = np.asarray(cache.pages_read), np.asarray(cache.stats_read)
        rows = []
        for i, length in enumerate(lengths.tolist()):
            # Decode step j (0-based) attends over length + j + 1 tokens in every layer and KV head.
            dense = sum(length + j + 1 for j in range(steps)) * 2 * mc.head_dim * item * mc.num_key_value_heads
            dense *= mc.num_hidden_layers
            rows.append({
                "prompt_tokens": int(length), "decode_steps": steps, "kv_pages_read": int(pages[i]),
                "kv_bytes_per_step": (pages[i] * page_bytes + stats[i] * stat_bytes) / max(steps, 1),
                "dense_kv_bytes_per_step": dense / max(steps, 1),
                "prefill_s": prefill_s, "decode_s": decode_s,  # the batch's wall time, shared by its requests
            })
        return rows
