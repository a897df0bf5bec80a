"""DuoAttention's dual KV cache and chunked-prefill generation on the unmodified decoder.

Per layer, retrieval KV heads keep a full contiguous cache [B, T, n_retrieval, D] (slot t = position t); streaming
KV heads keep `sink` slots plus a ring of `recent` slots [B, sink + recent, n_streaming, D] with the position of
every slot (-1 = empty). The head split is static (the pattern is fixed at deployment), so each head type runs its
own attention over only its own cache.

A chunk's streaming heads attend [ring cache; the chunk itself], then only the tokens that stay (sink tokens and
the chunk's last `recent`) are written to the ring. Two windows (`DualKVCache.window`):
- "official" (default; duo-attention@fe93c31 `duo_attn/patch/llama.py:225-290`): a chunk's streaming heads see
  every cached token (the first `sink` and the last `recent` before the chunk) plus the whole chunk, causal. So the
  first prefill chunk is dense for every head, a later chunk of C tokens sees sink + recent + up to C keys, and a
  decode step sees sink + recent + 1 keys.
- "token": token-exact Λ from the first chunk (query p sees keys < sink or in (p - recent, p]) whatever the chunk
  size; the efficiency mode, whose cost and accuracy do not depend on the chunking.
Queries at position -1 are padding: they write nothing and return zeros. Cost per chunk of C tokens: retrieval
heads O(C * max_len) like a contiguous cache, streaming heads O(C * (sink + recent + C)) masked einsums (memory
stays sink + recent; the block-sparse kernel path for long chunks is LServe's `pallas_kernels.hybrid_attention`
prefill).

`generate(protocol=...)` runs the official evaluation protocols (`PROTOCOLS`): "longbench" (`eval/LongBench/
pred.py:100-153`), "niah" (`scripts/niah.sh` with `eval/needle/needle_in_haystack.py:269-310`) and "efficiency"
(the token-exact window in 4096-token chunks). Executed on CPU only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import PartitionSpec

from jaxeff.checks import require_int
from jaxeff.duo_attention.pattern import check_head_mask
from jaxeff.models.llama import CONFIG_EOS, is_stop, num_generated, pad_prompts, resolve_stop_ids
from jaxeff.models.sharding import heads_spec, init_cache
from jaxeff.nn import attention, make_mask, xla_attention

WINDOWS = ("official", "token")


def _query_heads(kv_heads: Sequence[int], group: int) -> np.ndarray:
    return np.asarray([h * group + j for h in kv_heads for j in range(group)], np.int32)


@struct.dataclass
class DualKVCache:
    full_k: tuple
    full_v: tuple
    ring_k: tuple
    ring_v: tuple
    ring_pos: tuple
    retrieval: tuple = struct.field(pytree_node=False)  # per layer: retrieval KV head indices
    streaming: tuple = struct.field(pytree_node=False)
    sink: int = struct.field(pytree_node=False)
    recent: int = struct.field(pytree_node=False)
    window: str = struct.field(pytree_node=False, default="official")

    @classmethod
    def init(cls, retrieval_heads, batch: int, max_len: int, head_dim: int, *, sink: int, recent: int,
             dtype=jnp.float32, window: str = "official") -> DualKVCache:
        """retrieval_heads: bool [layers, kv_heads] (True = full KV cache); window: "official" or "token" (module
        docstring). ValueError for a mask that is not bool [layers, kv_heads] (gate values alpha: select first,
        `check_head_mask`), sink < 0, recent < 1, batch / max_len / head_dim < 1 or an unknown window."""
        mask = check_head_mask(retrieval_heads)
        sink, recent = require_int(sink, "sink", 0), require_int(recent, "recent", 1)
        batch, max_len = require_int(batch, "batch", 1), require_int(max_len, "max_len", 1)
        head_dim = require_int(head_dim, "head_dim", 1)
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
        ret = tuple(tuple(int(h) for h in np.flatnonzero(row)) for row in mask)
        stm = tuple(tuple(int(h) for h in np.flatnonzero(~row)) for row in mask)
        w = sink + recent
        return cls(
            full_k=tuple(jnp.zeros((batch, max_len, len(r), head_dim), dtype) for r in ret),
            full_v=tuple(jnp.zeros((batch, max_len, len(r), head_dim), dtype) for r in ret),
            ring_k=tuple(jnp.zeros((batch, w, len(s), head_dim), dtype) for s in stm),
            ring_v=tuple(jnp.zeros((batch, w, len(s), head_dim), dtype) for s in stm),
            ring_pos=tuple(jnp.full((batch, w), -1, jnp.int32) for _ in stm),
            retrieval=ret, streaming=stm, sink=sink, recent=recent, window=window,
        )

    @property
    def max_len(self) -> int:
        return self.full_k[0].shape[1]

    def partition_specs(self, n: int, axis: str) -> DualKVCache:
        """Tensor-parallel layout over n devices (`jaxeff.models.sharding.cache_specs`): each layer's full
        (retrieval) cache split by heads where its retrieval-head count divides n evenly, else over the sequence
        when max_len does, else replicated; the small streaming rings replicated."""
        full = tuple(heads_spec(x.shape[2], x.shape[1], n, axis, by_sequence=True) for x in self.full_k)
        ring = tuple(PartitionSpec() for _ in self.ring_k)
        return self.replace(full_k=full, full_v=full, ring_k=ring, ring_v=ring, ring_pos=ring)

    def kv_nbytes(self) -> int:
        """Bytes of stored keys and values (the slot positions, 4 bytes per ring slot and layer, excluded)."""
        return sum(x.size * x.dtype.itemsize for x in self.full_k + self.full_v + self.ring_k + self.ring_v)

    def dense_kv_nbytes(self) -> int:
        """Bytes a dense cache of the same batch, length and dtype would hold."""
        b, t, _, d = self.full_k[0].shape
        heads = sum(len(r) + len(s) for r, s in zip(self.retrieval, self.streaming))
        return 2 * b * t * heads * d * self.full_k[0].dtype.itemsize

    def attend(self, layer: int, q, k, v, q_positions, *, sliding_window=None, scale=None, implementation=None):
        ret, stm = self.retrieval[layer], self.streaming[layer]
        group = q.shape[2] // k.shape[2]
        b = q.shape[0]
        bidx = jnp.arange(b)[:, None]
        outs, order, new = [], [], {}
        if ret:
            qi = _query_heads(ret, group)
            slot = jnp.where(q_positions >= 0, q_positions, self.max_len)  # padding: dropped
            fk = self.full_k[layer].at[bidx, slot].set(k[:, :, ret].astype(self.full_k[layer].dtype), mode="drop")
            fv = self.full_v[layer].at[bidx, slot].set(v[:, :, ret].astype(self.full_v[layer].dtype), mode="drop")
            kv_pos = jnp.broadcast_to(jnp.arange(self.max_len, dtype=jnp.int32), (b, self.max_len))
            outs.append(attention(q[:, :, qi], fk.astype(q.dtype), fv.astype(q.dtype), q_positions=q_positions,
                                  kv_positions=kv_pos, causal=True, sliding_window=sliding_window, scale=scale,
                                  implementation=None if implementation == "pallas" else implementation))
            order.append(qi)
            new["full_k"], new["full_v"] = fk, fv
        if stm:
            qi = _query_heads(stm, group)
            ks, vs = k[:, :, stm], v[:, :, stm]
            rk, rv, rp = self.ring_k[layer], self.ring_v[layer], self.ring_pos[layer]
            keys = jnp.concatenate([rk.astype(q.dtype), ks], axis=1)
            vals = jnp.concatenate([rv.astype(q.dtype), vs], axis=1)
            kv_pos = jnp.concatenate([rp, jnp.where(q_positions >= 0, q_positions, -1)], axis=1)
            mask = make_mask(q_positions, kv_pos, causal=True, sliding_window=sliding_window)
            if self.window == "token":
                qp, kp = q_positions[:, :, None], kv_pos[:, None, :]
                mask &= (kp < self.sink) | (qp - kp < self.recent)
            scale_ = q.shape[-1] ** -0.5 if scale is None else scale
            outs.append(xla_attention(q[:, :, qi], keys, vals, mask, scale_))
            order.append(qi)
            # Keep sink tokens and the last `recent` tokens of the chunk; ring slot of position p >= sink.
            p = q_positions
            last = jnp.max(p, axis=1, keepdims=True)
            keep = (p >= 0) & ((p < self.sink) | (p > last - self.recent))
            slot = jnp.where(p < self.sink, p, self.sink + (p - self.sink) % self.recent)
            slot = jnp.where(keep, slot, self.sink + self.recent)
            new["ring_k"] = rk.at[bidx, slot].set(ks.astype(rk.dtype), mode="drop")
            new["ring_v"] = rv.at[bidx, slot].set(vs.astype(rv.dtype), mode="drop")
            new["ring_pos"] = rp.at[bidx, slot].set(p, mode="drop")
        out = jnp.concatenate(outs, axis=2)[:, :, np.argsort(np.concatenate(order))]
        cache = self.replace(**{name: _set(getattr(self, name), layer, x) for name, x in new.items()})
        return out, cache


def _set(items: tuple, i: int, x) -> tuple:
    return items[:i] + (x,) + items[i + 1:]


@dataclasses.dataclass
class DuoGenerateOutput:
    tokens: np.ndarray  # [B, max_new_tokens] greedy tokens; after a stop id: pad_id
    num_generated: np.ndarray  # [B], the stop id included
    kv_nbytes: int  # stored K/V bytes of the dual cache
    dense_kv_nbytes: int  # the same for a dense cache of equal capacity


# The official accuracy protocols (reference note, "Evaluation protocols") and jaxeff's efficiency mode: chunk_size
# 0 = the whole prompt (less the simulated decode steps) in one forward. Sink / recent are the caller's (LongBench
# and the NIAH script pass 64 / 256). "efficiency" is not the official efficiency benchmark (`benchmark_static.py`
# times the official window in 32K chunks, i.e. protocol "niah"): it is the token window, whose cost and accuracy
# do not depend on the chunking.
PROTOCOLS = {
    "longbench": dict(chunk_size=0, decode_simulation=50, window="official"),
    "niah": dict(chunk_size=32000, decode_simulation=0, window="official"),
    "efficiency": dict(chunk_size=4096, decode_simulation=0, window="token"),
}


@partial(jax.jit, static_argnames=("graphdef",))
def _prefill_chunk(graphdef, state, cache, tokens, positions, last_index):
    """One prefill chunk; returns the logits at each row's `last_index` in this chunk (clipped) and the cache."""
    logits, cache = nnx.merge(graphdef, state)(tokens, positions, cache=cache)
    idx = jnp.clip(last_index, 0, tokens.shape[1] - 1)
    return jnp.take_along_axis(logits, idx[:, None, None], axis=1)[:, 0], cache


@partial(jax.jit, static_argnames=("graphdef",))
def _feed(graphdef, state, cache, tokens, positions):
    """Prompt tokens [B, n] fed one per step as decode steps (LongBench's decoding simulation); returns the last
    step's logits and the cache."""
    model = nnx.merge(graphdef, state)

    def step(carry, xs):
        logits, cache = model(xs[0][:, None], xs[1][:, None], cache=carry[0])
        return (cache, logits[:, 0].astype(jnp.float32)), None

    init = jnp.zeros((tokens.shape[0], model.config.vocab_size), jnp.float32)
    (cache, logits), _ = jax.lax.scan(step, (cache, init), (tokens.T, positions.T))
    return logits, cache


@partial(jax.jit, static_argnames=("graphdef", "steps", "pad_id"))
def _decode(graphdef, state, cache, first, start_pos, stop_ids, steps, pad_id):
    model = nnx.merge(graphdef, state)

    def step(carry, _):
        cache, token, pos, done = carry
        logits, cache = model(token[:, None], pos[:, None], cache=cache)
        nxt = jnp.where(done, pad_id, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32))
        return (cache, nxt, pos + 1, done | is_stop(nxt, stop_ids)), nxt

    (cache, _, _, _), rest = jax.lax.scan(step, (cache, first, start_pos, is_stop(first, stop_ids)), None,
                                          length=steps)
    return rest.T, cache


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, retrieval_heads, sink: int,
             recent: int, protocol: str | None = None, chunk_size: int | None = None,
             decode_simulation: int | None = None, window: str | None = None, max_len: int | None = None,
             eos_id: int | Sequence[int] | None | str = CONFIG_EOS, pad_id: int = 0) -> DuoGenerateOutput:
    """Greedy generation with the dual cache: chunked prefill, optional simulated decode steps over the prompt's
    tail, then a compiled `lax.scan` decode loop.

    Args:
      prompts: token lists (any lengths; right-padded internally).
      retrieval_heads: bool [layers, kv_heads], True = full KV cache (`select_retrieval_heads`).
      sink, recent: streaming heads' cache (the official deployment keeps sink + recent and sees one more at decode).
      protocol: None or a `PROTOCOLS` name, whose chunk_size / decode_simulation / window fill the arguments the
        caller leaves None: "longbench" = one dense forward over all but the last 50 prompt tokens, those 50 fed
        as decode steps with the streaming caches, then generation; "niah" = 32000-token chunks (the first dense,
        later ones [sink + recent cache; chunk] for streaming heads), no simulation; "efficiency" = the token-exact
        window from the first chunk, 4096-token chunks.
      chunk_size: prefill chunk length; 0 = the whole (non-simulated) prompt in one forward; None = the
        protocol's, else 4096.
      decode_simulation: the last n prompt tokens of every row are fed one per step as decode steps (default 0);
        every prompt must be longer than n.
      window: "official" (default) or "token", see the module docstring.
      eos_id: `CONFIG_EOS` (the default) stops at the checkpoint's ids (`generation_stop_ids(model.config)`:
        generation_config.json's `eos_token_id`, else config.json's, as transformers' `generate`); None never
        stops; one id or several replace them (`jaxeff.models.llama.resolve_stop_ids`, the rule of every
        generate loop). A row stops after the first stop id it generates and is `pad_id` after it.
    A model placed by `jaxeff.models.sharding.shard_model` runs tensor-parallel (GSPMD) with its cache sharded
    as `jaxeff.models.sharding.cache_specs` says (give a `max_len` that is a multiple of the mesh size, so layers
    whose retrieval-head count does not split over it split their cache over the sequence instead).
    Returns `DuoGenerateOutput`. ValueError for retrieval_heads that is not a bool selection (gate values alpha:
    `select_retrieval_heads` first) or of another shape, an unknown protocol / window, a prompt not longer than
    decode_simulation, a cache too short, or sizes that are not integers in range.
    """
    if protocol is not None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)} or None, got {protocol!r}")
        preset = PROTOCOLS[protocol]
        chunk_size = preset["chunk_size"] if chunk_size is None else chunk_size
        decode_simulation = preset["decode_simulation"] if decode_simulation is None else decode_simulation
        window = preset["window"] if window is None else window
    chunk_size = 4096 if chunk_size is None else chunk_size
    decode_simulation = 0 if decode_simulation is None else decode_simulation
    window = "official" if window is None else window
    mc = model.config
    mask = check_head_mask(retrieval_heads, shape=(mc.num_hidden_layers, mc.num_key_value_heads))
    max_new_tokens = require_int(max_new_tokens, "max_new_tokens", 1)
    chunk_size = require_int(chunk_size, "chunk_size (0 = the whole prompt)", 0)
    decode_simulation = require_int(decode_simulation, "decode_simulation", 0)
    sink, recent = require_int(sink, "sink", 0), require_int(recent, "recent", 1)
    stops = resolve_stop_ids(mc, eos_id)
    tokens, lengths = pad_prompts(prompts, pad_id, vocab_size=mc.vocab_size)
    if lengths.min() <= decode_simulation:
        raise ValueError(f"a prompt of {int(lengths.min())} tokens is not longer than decode_simulation="
                         f"{decode_simulation}")
    need = int(lengths.max()) + max_new_tokens
    max_len = need if max_len is None else require_int(max_len, "max_len", 1)
    if need > max_len:
        raise ValueError(f"prompt ({int(lengths.max())} tokens) + {max_new_tokens} new tokens exceed the cache "
                         f"length {max_len}")
    dense_len = lengths - decode_simulation  # per row: tokens prefilled in chunks
    width = int(dense_len.max())
    chunk = width if chunk_size == 0 else min(chunk_size, width)
    n_chunks = -(-width // chunk)
    cols = np.arange(n_chunks * chunk)[None]
    pre_tokens = np.pad(tokens, ((0, 0), (0, max(n_chunks * chunk - tokens.shape[1], 0))),
                        constant_values=pad_id)[:, : n_chunks * chunk]
    positions = np.where(cols < dense_len[:, None], cols, -1).astype(np.int32)
    # On a model placed by `jaxeff.models.sharding.shard_model` the cache is built in its shards.
    cache = init_cache(lambda: DualKVCache.init(mask, len(prompts), max_len, mc.head_dim, sink=sink, recent=recent,
                                                dtype=model.dtype, window=window), model)
    graphdef, state = nnx.split(model)
    first_logits = None
    for c in range(n_chunks):
        sl = slice(c * chunk, (c + 1) * chunk)
        last = jnp.asarray(dense_len - 1 - c * chunk)
        logits, cache = _prefill_chunk(graphdef, state, cache, jnp.asarray(pre_tokens[:, sl]),
                                       jnp.asarray(positions[:, sl]), last)
        here = ((last >= 0) & (last < chunk))[:, None]
        first_logits = logits if first_logits is None else jnp.where(here, logits, first_logits)
    if decode_simulation:
        sim_pos = dense_len[:, None] + np.arange(decode_simulation)[None]
        sim_tokens = np.take_along_axis(tokens, sim_pos, axis=1)
        first_logits, cache = _feed(graphdef, state, cache, jnp.asarray(sim_tokens),
                                    jnp.asarray(sim_pos.astype(np.int32)))
    first = jnp.argmax(first_logits, axis=-1).astype(jnp.int32)
    out = [np.asarray(first)[:, None]]
    if max_new_tokens > 1:
        rest, cache = _decode(graphdef, state, cache, first, jnp.asarray(lengths), jnp.asarray(stops, jnp.int32),
                              steps=max_new_tokens - 1, pad_id=pad_id)
        out.append(np.asarray(rest))
    out = np.concatenate(out, axis=1)
    return DuoGenerateOutput(out, num_generated(out, stops), cache.kv_nbytes(), cache.dense_kv_nbytes())
