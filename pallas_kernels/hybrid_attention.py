"""Hybrid streaming/dense block-sparse attention (DuoAttention training and prefill, LServe prefill).

Every KV head is either dense (causal) or streaming (causal and Λ-shaped: `sink` first tokens plus a `local`
window); `causal=False` makes every head dense and non-causal (every real key visible: HART's attention over its
KV cache), and the block schedule then covers all KV blocks. Query i sits at position `q_offset + i` (chunked
prefill). Masks are token-exact, or block-granular as DuoAttention's training kernel (`window_block`,
`hybrid_mask`); work skips every block that the mask empties, so a streaming head costs
O(Sq * (sink + local + block)) whatever the context. Key padding up to a block multiple is always masked.

Three implementations share `block_ranges` (the active KV blocks of each query block) and `hybrid_mask`:
- `_xla_hybrid`: plain XLA. Dense heads attend per query chunk to the static causal key prefix; streaming heads
  gather, per query block, the sink blocks plus a fixed-width window of local blocks. Differentiable by autodiff
  (dense chunks rematerialised).
- `_pallas_tpu_forward` / `_pallas_tpu_backward`: Mosaic-style kernels, grid (B, Hq, q blocks, active KV blocks)
  with a (u1, l2, hi) range table in scalar prefetch (SMEM), so the pipeline DMAs only active KV blocks; block
  dims are (block, head_dim). The backward is FlashAttention-2 style from the saved log-sum-exp: a dq kernel on
  the forward schedule and a dk/dv kernel on the transposed one.
  jax's splash attention (`ops/tpu/splash_attention`) could serve TPU with a `MultiHeadMask` (CausalMask with
  offset, and a custom computable sink-or-local mask, since its LocalMask has no sink); we keep our own kernel
  because splash builds its MaskInfo on the host over all nq x nk blocks and keeps [heads, nq, nk] arrays in SMEM,
  while ours needs O(Hkv * nq) scalars and recomputes masks in-kernel.
- `_cudnn_hybrid` (GPU default where it applies): dense heads through cuDNN's fused attention, streaming heads
  through the Triton-style kernel below, as DuoAttention's own code pairs FlashAttention with a streaming kernel.
- `_pallas_gpu_forward` / `_pallas_gpu_backward`: Triton-style kernels, grid (q blocks, B, Hq), two in-kernel loops
  (sink blocks, local or causal blocks) with data-dependent bounds; Triton has no scalar prefetch, hence separate
  kernels. The dk/dv kernel loops each KV block over its query-block range per query head, then sums GQA groups.

Backends actually executed: CPU (XLA path; all six Pallas kernels in interpret mode, the TPU-style forward and
backward also under `pltpu.force_tpu_interpret_mode()`) and an NVIDIA H200 (jax 0.11.2: the Triton-style forward
and backward compiled, and the cuDNN split, against the reference in tests/test_pallas_device.py; timings in
`make bench name=attention`). The TPU-style kernels lower for TPU (Pallas -> Mosaic) through `jax.export` but
have not run on a TPU. `causal=False` has run on CPU only (XLA path, the six kernels in interpret mode, the TPU-style
ones also under `pltpu.force_tpu_interpret_mode()`) and lowers for TPU and GPU through `jax.export`; neither it
nor the non-causal cuDNN split has run on a GPU or TPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    MASK_VALUE,
    check_gqa,
    check_int,
    check_streaming_heads,
    default_scale,
    resolve_implementation,
    token_mask,
)

# Queries are split in at most this many static chunks on the XLA dense path (coarse causal skipping).
_MAX_DENSE_CHUNKS = 16


@dataclasses.dataclass(frozen=True)
class _Cfg:
    sq: int
    sk: int
    q_offset: int
    sink: int
    local: int
    scale: float
    block_q: int
    block_k: int
    static_flags: tuple[bool, ...] | None  # None when streaming_heads is traced
    window_block: int = 1  # > 1: the local window is counted from the end of the query's window block
    causal: bool = True  # False: every real key visible to every query (dense heads only)
    num_warps: int | None = None  # Triton launch parameters (GPU only); None: chosen from the block shape
    num_stages: int | None = None

    @property
    def nq(self) -> int:
        return -(-self.sq // self.block_q)

    @property
    def nk(self) -> int:
        return -(-self.sk // self.block_k)


def window_pos(qpos, window_block: int):
    """Position from which a query's local window is counted: itself (token-exact, window_block 1) or the last
    position of its `window_block`-aligned block (DuoAttention's block-granular training mask)."""
    return qpos if window_block == 1 else (qpos // window_block) * window_block + (window_block - 1)


def hybrid_mask(qpos, kpos, streaming, sink: int, local: int, window_block: int = 1):
    """Key kpos visible to query qpos: causal, and for streaming heads a sink token or one of the `local` keys
    ending at `window_pos(qpos)`. window_block 1 is `token_mask`; window_block 128 with sink 128 / local 256 is
    Block-Sparse-Attention's `block_streaming_attn_func` with 1 sink block and 2 local blocks (query block i sees
    key blocks 0, i - 1 and i, causal inside i; bsa@49d6c39 csrc/block_sparse_attn/src/flash_blockmask.h)."""
    if window_block == 1:
        return token_mask(qpos, kpos, streaming, sink, local)
    return token_mask(window_pos(qpos, window_block), kpos, streaming, sink, local) & (kpos <= qpos)


def _mask(qpos, kpos, streaming, cfg: _Cfg):
    if not cfg.causal:  # dense heads only (make_config): every key that exists
        return kpos < cfg.sk
    return hybrid_mask(qpos, kpos, streaming, cfg.sink, cfg.local, cfg.window_block)


def block_ranges(xp, stream, *, sq, sk, q_offset, sink, local, block_q, block_k, window_block=1, causal=True):
    """Active KV blocks of every (KV head, query block): blocks [0, u1) and [l2, hi); all [Hkv, nq] ints.

    `xp` is numpy (static flags) or jax.numpy (traced flags). Dense heads get u1 = l2 = 0 (causal prefix; with
    causal=False every KV block, hi = nk).
    """
    nq, nk = -(-sq // block_q), -(-sk // block_k)
    i = xp.arange(nq)
    p_lo = q_offset + i * block_q
    p_hi = q_offset + xp.minimum((i + 1) * block_q, sq) - 1
    hi = (xp.minimum(p_hi // block_k + 1, nk) if causal else xp.full(nq, nk))[None, :]
    n_sink = min(-(-sink // block_k), nk)
    local_lo = (xp.maximum(window_pos(p_lo, window_block) - local + 1, 0) // block_k)[None, :]
    stream = xp.asarray(stream).astype(bool)[:, None]
    u1 = xp.where(stream, xp.minimum(n_sink, hi), 0)
    l2 = xp.where(stream, xp.maximum(local_lo, u1), 0)
    hi = xp.broadcast_to(hi, u1.shape)
    return u1, l2, hi


def hybrid_attention_block_count(q_len: int, kv_len: int, streaming_heads, *, sink: int, local: int,
                                 q_offset: int = 0, block_q: int = 128, block_k: int = 128,
                                 window_block: int = 1, causal: bool = True) -> int:
    """Number of (query block, KV block) pairs the kernels compute, summed over KV heads, for one batch row.

    Each query head of a GQA group runs its KV head's blocks, so query-head work is this times Hq / Hkv.
    """
    stream = np.asarray(streaming_heads, bool)
    _check_non_causal(causal, stream)
    sink, local = _round_up(sink, window_block), _round_up(local, window_block)
    u1, l2, hi = block_ranges(np, stream, sq=q_len, sk=kv_len, q_offset=q_offset, sink=sink, local=local,
                              block_q=block_q, block_k=block_k, window_block=window_block, causal=causal)
    return int((u1 + np.maximum(hi - l2, 0)).sum())


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def _check_non_causal(causal: bool, static_flags) -> None:
    """causal=False is dense attention: refuses streaming heads, and traced flags (which could hold some)."""
    if causal:
        return
    if static_flags is None:
        raise ValueError("causal=False needs concrete streaming_heads (all False), not traced ones")
    if np.any(static_flags):
        raise ValueError("causal=False supports dense heads only: streaming_heads must all be False (a streaming "
                         "head's sink + local window is defined over causal positions)")


def hybrid_attention_reference(q, k, v, *, streaming_heads, sink, local, q_offset=0, scale=None, window_block=1,
                               causal=True):
    """Dense masked attention in float32 (the plain-JAX reference); returns q.dtype [B, Sq, Hq, D].

    window_block > 1: sink and local are rounded up to multiples of it and the mask is `hybrid_mask`'s.
    causal=False: every key visible (streaming_heads must be concrete and all False)."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    _check_non_causal(causal, check_streaming_heads(streaming_heads, hkv)[1])
    g = hq // hkv
    scale = default_scale(scale, d)
    qg = q.astype(jnp.float32).reshape(b, sq, hkv, g, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)) * scale
    qpos = q_offset + jnp.arange(sq)[:, None]
    kpos = jnp.arange(sk)[None, :]
    stream = jnp.asarray(streaming_heads, bool)[:, None, None, None]
    mask = hybrid_mask(qpos, kpos, stream, _round_up(sink, window_block), _round_up(local, window_block),
                       window_block) if causal else jnp.ones((sq, sk), bool)
    s = jnp.where(mask, s, MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32))
    return o.reshape(b, sq, hq, d).astype(q.dtype)


def _masked_softmax_av(s, mask, v_blocks, v_spec):
    s = jnp.where(mask, s, MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum(v_spec, p.astype(v_blocks.dtype), v_blocks, preferred_element_type=jnp.float32)


@functools.partial(jax.checkpoint, static_argnums=(4, 5))
def _dense_chunk(q, k, v, stream, q_start: int, cfg: _Cfg):
    # Rematerialised: the backward holds one chunk's [chunk, prefix] scores at a time, not all of them.
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32)
    qpos = cfg.q_offset + q_start + jnp.arange(q.shape[1])[:, None]
    mask = _mask(qpos, jnp.arange(k.shape[1])[None, :], stream[:, None, None, None], cfg)
    return _masked_softmax_av(s * cfg.scale, mask, v, "bhgqk,bkhd->bqhgd")


def _xla_dense_group(q, k, v, stream, cfg: _Cfg):
    """q [B, Sq, h, G, D], k/v [B, Sk, h, D], stream [h] bool: per query chunk, attend the causal key prefix
    (causal=False: all keys; the chunks then only bound the rematerialised backward's scores)."""
    sq = q.shape[1]
    chunk = cfg.block_q * -(-cfg.nq // _MAX_DENSE_CHUNKS)
    outs = []
    for a in range(0, sq, chunk):
        kend = min(cfg.sk, cfg.q_offset + min(a + chunk, sq)) if cfg.causal else cfg.sk
        outs.append(_dense_chunk(q[:, a:a + chunk], k[:, :kend], v[:, :kend], jnp.asarray(stream), a, cfg))
    return jnp.concatenate(outs, axis=1)


def _xla_streaming_group(q, k, v, cfg: _Cfg):
    """All heads streaming: per query block, the sink blocks plus a fixed-width window of local blocks."""
    bq, bk, nq, nk = cfg.block_q, cfg.block_k, cfg.nq, cfg.nk
    h = k.shape[2]
    u1, l2, hi = block_ranges(np, np.ones(1, bool), sq=cfg.sq, sk=cfg.sk, q_offset=cfg.q_offset, sink=cfg.sink,
                              local=cfg.local, block_q=bq, block_k=bk, window_block=cfg.window_block)
    n_sink, width = int(u1.max()), int(np.maximum(hi - l2, 0).max())
    if n_sink + width >= nk:  # the window covers (almost) everything: the masked prefix path is cheaper
        return _xla_dense_group(q, k, v, np.ones(h, bool), cfg)
    b, sq, _, g, d = q.shape
    qp = jnp.pad(q, ((0, 0), (0, nq * bq - sq), (0, 0), (0, 0), (0, 0))).reshape(b, nq, bq, h, g, d)
    kp = jnp.pad(k, ((0, 0), (0, nk * bk - cfg.sk), (0, 0), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (0, nk * bk - cfg.sk), (0, 0), (0, 0)))
    start = np.minimum(l2[0], nk - width) * bk  # static window start per query block
    win = start[:, None] + np.arange(width * bk)[None, :]  # [nq, W*bk] key positions
    qpos = cfg.q_offset + np.arange(nq * bq).reshape(nq, bq, 1)
    sink_pos = np.arange(n_sink * bk)
    # Sink part: every query block shares the first n_sink blocks.
    s_sink = jnp.einsum("bnqhgd,bkhd->bnhgqk", qp, kp[:, : n_sink * bk], preferred_element_type=jnp.float32)
    m_sink = _mask(qpos, sink_pos[None, None, :], True, cfg) & (sink_pos < cfg.sk)
    # Window part: gathered per block; keys already covered by the sink part are masked out.
    k_win, v_win = kp[:, win], vp[:, win]  # [B, nq, W*bk, h, D]
    s_win = jnp.einsum("bnqhgd,bnkhd->bnhgqk", qp, k_win, preferred_element_type=jnp.float32)
    m_win = (_mask(qpos, win[:, None, :], True, cfg) & (win[:, None, :] >= n_sink * bk)
             & (win[:, None, :] < cfg.sk))
    s = jnp.concatenate([jnp.broadcast_to(s_sink, s_win.shape[:-1] + s_sink.shape[-1:]), s_win], -1) * cfg.scale
    mask = jnp.concatenate([jnp.broadcast_to(m_sink, m_win.shape[:-1] + m_sink.shape[-1:]), m_win], -1)
    mask = mask[None, :, None, None]  # [1, nq, 1, 1, bq, keys]
    v_all = jnp.concatenate([jnp.broadcast_to(vp[:, None, : n_sink * bk], (b, nq, n_sink * bk, h, d)), v_win], 2)
    o = _masked_softmax_av(s, mask, v_all, "bnhgqk,bnkhd->bnqhgd")
    return o.reshape(b, nq * bq, h, g, d)[:, :sq]


def _split_head_kinds(q, k, v, cfg: _Cfg, streaming_fn, dense_fn):
    """Runs streaming_fn / dense_fn(q [B, Sq, h, G, D], k, v) on the streaming / dense KV heads (static flags)
    and puts the outputs back in head order; returns [B, Sq, Hq, D] in q.dtype."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, sq, hkv, hq // hkv, d)
    stream = np.asarray(cfg.static_flags)
    parts = [(idx, fn) for idx, fn in ((np.flatnonzero(stream), streaming_fn), (np.flatnonzero(~stream), dense_fn))
             if idx.size]
    outs = [fn(qg[:, :, idx], k[:, :, idx], v[:, :, idx]) for idx, fn in parts]
    o = jnp.concatenate(outs, axis=2)[:, :, np.argsort(np.concatenate([idx for idx, _ in parts]))]
    return o.reshape(b, sq, hq, d).astype(q.dtype)


def _xla_hybrid(q, k, v, flags, cfg: _Cfg):
    if cfg.static_flags is None:  # traced pattern: no static head split, masked prefix path for all heads
        b, sq, hq, d = q.shape
        o = _xla_dense_group(q.reshape(b, sq, k.shape[2], -1, d), k, v, flags.astype(bool), cfg)
        return o.reshape(b, sq, hq, d).astype(q.dtype)
    return _split_head_kinds(q, k, v, cfg, lambda q, k, v: _xla_streaming_group(q, k, v, cfg),
                             lambda q, k, v: _xla_dense_group(q, k, v, np.zeros(k.shape[2], bool), cfg))


def _cudnn_applies(q, cfg: _Cfg) -> bool:
    # jax's cuDNN attention: fp16/bf16, head_dim <= 128 in multiples of 8, and a causal mask aligned at query 0
    # (non-causal: any Sq, Sk)
    return (jax.default_backend() == "gpu" and cfg.static_flags is not None
            and (not cfg.causal or (cfg.q_offset == 0 and cfg.sq == cfg.sk))
            and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def _cudnn_hybrid(q, k, v, cfg: _Cfg):
    """Dense heads through cuDNN's fused attention (causal or not), streaming heads through the Triton kernel."""
    ungroup = lambda qg: qg.reshape(*qg.shape[:2], -1, qg.shape[-1])

    def dense(qg, k, v):
        return jax.nn.dot_product_attention(ungroup(qg), k, v, scale=cfg.scale, is_causal=cfg.causal,
                                            implementation="cudnn").reshape(qg.shape)

    def streaming(qg, k, v):
        sub = dataclasses.replace(cfg, static_flags=(True,) * k.shape[2])
        return _pallas_hybrid(ungroup(qg), k, v, jnp.ones(k.shape[2], jnp.int32), sub, "gpu", False).reshape(qg.shape)

    return _split_head_kinds(q, k, v, cfg, streaming, dense)


def _online_softmax_step(q, k, v, m, l, acc, qpos, kpos, stream, cfg: _Cfg):
    """One KV block of the flash-attention recurrence; m, l are [bq, 1], acc [bq, D] (float32).

    qpos is None for a block that every query sees whole: no mask arithmetic."""
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * cfg.scale
    if qpos is not None:
        mask = _mask(qpos, kpos, stream, cfg) & (kpos < cfg.sk)
        s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - m_new)
    if qpos is not None:
        p = jnp.where(mask, p, 0.0)
    alpha = jnp.exp(m - m_new)
    l_new = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
    acc_new = alpha * acc + lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                            preferred_element_type=jnp.float32)
    return m_new, l_new, acc_new


def _schedule(flags, cfg: _Cfg):
    """int32 [Hkv, nq, 3] table of (u1, l2, hi) and the static number of KV steps per query block."""
    if cfg.static_flags is not None:
        u1, l2, hi = block_ranges(np, np.asarray(cfg.static_flags), sq=cfg.sq, sk=cfg.sk, q_offset=cfg.q_offset,
                                  sink=cfg.sink, local=cfg.local, block_q=cfg.block_q, block_k=cfg.block_k,
                                  window_block=cfg.window_block, causal=cfg.causal)
        steps = int((u1 + np.maximum(hi - l2, 0)).max())
        return jnp.asarray(np.stack([u1, l2, hi], -1), jnp.int32), steps
    u1, l2, hi = block_ranges(jnp, flags, sq=cfg.sq, sk=cfg.sk, q_offset=cfg.q_offset, sink=cfg.sink,
                              local=cfg.local, block_q=cfg.block_q, block_k=cfg.block_k,
                              window_block=cfg.window_block, causal=cfg.causal)
    return jnp.stack([u1, l2, hi], -1).astype(jnp.int32), cfg.nk  # traced: worst case is a dense head


def _kv_block(ranges_ref, row, t):
    """KV block of step t for a flattened (KV head, query block) row; steps past the end repeat the last block,
    so the TPU pipeline issues no DMA for them. O(Hkv * nq) scalars instead of a per-step list in SMEM."""
    u1, l2, hi = ranges_ref[3 * row], ranges_ref[3 * row + 1], ranges_ref[3 * row + 2]
    cnt = u1 + jnp.maximum(hi - l2, 0)
    j = jnp.maximum(jnp.minimum(t, cnt - 1), 0)
    return jnp.where(j < u1, j, l2 + j - u1), t < cnt


def _pad_seq(x, n):
    return jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))


def _pallas_tpu_forward(q, k, v, flags, cfg: _Cfg, interpret):
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    bq, bk, nq, nk = cfg.block_q, cfg.block_k, cfg.nq, cfg.nk
    ranges, steps = _schedule(flags, cfg)
    # [B, H, S, D] so that a block's last two dims are (block, head_dim) as Mosaic wants.
    qt = _pad_seq(q, nq * bq).transpose(0, 2, 1, 3)
    kt = _pad_seq(k, nk * bk).transpose(0, 2, 1, 3)
    vt = _pad_seq(v, nk * bk).transpose(0, 2, 1, 3)

    def kernel(ranges_ref, flag_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr):
        h, i, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
        hk = h // g

        @pl.when(t == 0)
        def _init():
            m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
            l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
            acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

        kb, active = _kv_block(ranges_ref, hk * nq + i, t)

        @pl.when(active)
        def _step():
            qpos = cfg.q_offset + i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            kpos = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            m, l_, acc = _online_softmax_step(q_ref[...], k_ref[...], v_ref[...], m_scr[...], l_scr[...],
                                              acc_scr[...], qpos, kpos, flag_ref[hk] != 0, cfg)
            m_scr[...], l_scr[...], acc_scr[...] = m, l_, acc

        @pl.when(t == steps - 1)
        def _finish():
            l_ = l_scr[...]
            o_ref[...] = (acc_scr[...] / jnp.where(l_ == 0.0, 1.0, l_)).astype(o_ref.dtype)
            lse_ref[...] = jnp.where(l_ == 0.0, 0.0, m_scr[...] + jnp.log(jnp.where(l_ == 0.0, 1.0, l_)))

    def kv_map(b_, h, i, t, ranges_ref, flag_ref):
        return b_, h // g, _kv_block(ranges_ref, (h // g) * nq + i, t)[0], 0

    def q_map(b_, h, i, t, *_):
        return b_, h, i, 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, hq, nq, steps),
        in_specs=[pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bk, d), kv_map),
                  pl.BlockSpec((None, None, bk, d), kv_map)],
        out_specs=[pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bq, 1), q_map)],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)],
    )
    out, lse = pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, hq, nq * bq, d), q.dtype),
                   jax.ShapeDtypeStruct((b, hq, nq * bq, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret, name="hybrid_attention_tpu",
    )(ranges.reshape(-1), flags, qt, kt, vt)
    return out.transpose(0, 2, 1, 3)[:, :sq], lse


def _transposed_schedule(flags, cfg: _Cfg):
    """Per (KV head, KV block) the contiguous range [qa, qb) of query blocks that use it: int32 [Hkv, nk, 2].

    Contiguous because u1, l2 and hi never decrease along the query blocks."""
    xp = np if cfg.static_flags is not None else jnp
    stream = np.asarray(cfg.static_flags) if cfg.static_flags is not None else flags.astype(bool)
    u1, l2, hi = block_ranges(xp, stream, sq=cfg.sq, sk=cfg.sk, q_offset=cfg.q_offset, sink=cfg.sink,
                              local=cfg.local, block_q=cfg.block_q, block_k=cfg.block_k,
                              window_block=cfg.window_block, causal=cfg.causal)
    kb = xp.arange(cfg.nk)[None, :, None]
    n_sink = xp.where(xp.asarray(stream), min(-(-cfg.sink // cfg.block_k), cfg.nk), 0)[:, None]
    qa = (hi[:, None, :] <= kb).sum(-1)
    qb = xp.where(kb[..., 0] < n_sink, cfg.nq, (l2[:, None, :] <= kb).sum(-1))
    steps = int(np.maximum(qb - qa, 0).max()) if xp is np else cfg.nq
    return jnp.asarray(xp.stack([qa, qb], -1), jnp.int32), max(steps, 1)


def _q_block(qranges_ref, row, t, num_q_blocks):
    qa, qb = qranges_ref[2 * row], qranges_ref[2 * row + 1]
    i = jnp.minimum(qa + jnp.maximum(jnp.minimum(t, qb - qa - 1), 0), num_q_blocks - 1)  # KV blocks of padding
    return i, t < qb - qa


def _probs(q, k, lse, qpos, kpos, stream, cfg: _Cfg):
    """Softmax probabilities of one block from the saved log-sum-exp; padded queries and keys give 0.

    qpos None: a block that every query sees whole, unmasked (padded query rows are then garbage to discard)."""
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * cfg.scale
    if qpos is None:
        return jnp.exp(s - lse)
    mask = _mask(qpos, kpos, stream, cfg) & (kpos < cfg.sk) & (qpos < cfg.q_offset + cfg.sq)
    return jnp.where(mask, jnp.exp(s - lse), 0.0)


def _pallas_tpu_backward(q, k, v, flags, out, lse, do, cfg: _Cfg, interpret):
    """FlashAttention-2 style backward over the same active blocks: a dq kernel on the forward schedule and a
    dk/dv kernel on the transposed one (each KV block visits its contiguous range of query blocks)."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    bq, bk, nq, nk = cfg.block_q, cfg.block_k, cfg.nq, cfg.nk
    ranges, steps = _schedule(flags, cfg)
    qranges, qsteps = _transposed_schedule(flags, cfg)
    qt, dot_ = (_pad_seq(x, nq * bq).transpose(0, 2, 1, 3) for x in (q, do))
    kt, vt = (_pad_seq(x, nk * bk).transpose(0, 2, 1, 3) for x in (k, v))
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)  # [B, Sq, Hq, 1]
    delta = _pad_seq(delta, nq * bq).transpose(0, 2, 1, 3)
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))

    def dq_kernel(ranges_ref, flag_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, acc_scr):
        h, i, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
        kb, active = _kv_block(ranges_ref, (h // g) * nq + i, t)

        @pl.when(t == 0)
        def _init():
            acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

        @pl.when(active)
        def _step():
            qpos = cfg.q_offset + i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            kpos = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            k_blk = k_ref[...]
            p = _probs(q_ref[...], k_blk, lse_ref[...], qpos, kpos, flag_ref[h // g] != 0, cfg)
            dp = lax.dot_general(do_ref[...], v_ref[...], (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
            ds = p * (dp - delta_ref[...])
            acc_scr[...] += lax.dot_general(ds.astype(k_blk.dtype), k_blk, (((1,), (0,)), ((), ())),
                                            preferred_element_type=jnp.float32)

        @pl.when(t == steps - 1)
        def _finish():
            dq_ref[...] = (acc_scr[...] * cfg.scale).astype(dq_ref.dtype)

    def q_map(b_, h, i, t, *_):
        return b_, h, i, 0

    def kv_map(b_, h, i, t, ranges_ref, flag_ref):
        return b_, h // g, _kv_block(ranges_ref, (h // g) * nq + i, t)[0], 0

    q_spec, row_spec = pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bq, 1), q_map)
    kv_spec = pl.BlockSpec((None, None, bk, d), kv_map)
    dq = pl.pallas_call(
        dq_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, hq, nq, steps),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec], out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype), compiler_params=params, interpret=interpret,
        name="hybrid_attention_dq_tpu",
    )(ranges.reshape(-1), flags, qt, kt, vt, dot_, lse, delta)

    def dkv_kernel(qranges_ref, flag_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                   dk_scr, dv_scr):
        hk, kb, gi, t = pl.program_id(1), pl.program_id(2), pl.program_id(3), pl.program_id(4)
        i, active = _q_block(qranges_ref, hk * nk + kb, t, nq)

        @pl.when((gi == 0) & (t == 0))
        def _init():
            dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
            dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

        @pl.when(active)
        def _step():
            qpos = cfg.q_offset + i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            kpos = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            q_blk, do_blk = q_ref[...], do_ref[...]
            p = _probs(q_blk, k_ref[...], lse_ref[...], qpos, kpos, flag_ref[hk] != 0, cfg)
            dv_scr[...] += lax.dot_general(p.astype(do_blk.dtype), do_blk, (((0,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32)
            dp = lax.dot_general(do_blk, v_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            ds = p * (dp - delta_ref[...])
            dk_scr[...] += lax.dot_general(ds.astype(q_blk.dtype), q_blk, (((0,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32)

        @pl.when((gi == g - 1) & (t == qsteps - 1))
        def _finish():
            dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
            dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)

    def qt_map(b_, hk, kb, gi, t, qranges_ref, flag_ref):
        return b_, hk * g + gi, _q_block(qranges_ref, hk * nk + kb, t, nq)[0], 0

    def k_map(b_, hk, kb, gi, t, *_):
        return b_, hk, kb, 0

    qt_spec, qrow_spec = pl.BlockSpec((None, None, bq, d), qt_map), pl.BlockSpec((None, None, bq, 1), qt_map)
    k_spec = pl.BlockSpec((None, None, bk, d), k_map)
    dk, dv = pl.pallas_call(
        dkv_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, hkv, nk, g, qsteps),
            in_specs=[qt_spec, k_spec, k_spec, qt_spec, qrow_spec, qrow_spec], out_specs=[k_spec, k_spec],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=interpret, name="hybrid_attention_dkv_tpu",
    )(qranges.reshape(-1), flags, qt, kt, vt, dot_, lse, delta)
    untranspose = lambda x, n: x.transpose(0, 2, 1, 3)[:, :n]
    return untranspose(dq, sq), untranspose(dk, cfg.sk), untranspose(dv, cfg.sk)


def _gpu_bounds(flags, cfg: _Cfg):
    """(u1, l2, hi, streaming) per (KV head, query block); 4 entries keep Triton's power-of-two shapes."""
    ranges, _ = _schedule(flags, cfg)
    stream = jnp.broadcast_to(flags[:, None, None], ranges.shape[:2] + (1,))
    return jnp.concatenate([ranges, stream], axis=-1)


def _gpu_kv_loops(bounds_ref, i, body, carry, cfg: _Cfg):
    """Runs `body(kb, carry, masked)` over the active KV blocks of query block i.

    Blocks that every query of the block sees whole (all keys causal, real, and for streaming heads inside every
    query's local window) run with masked=False and skip the mask arithmetic: all but the diagonal of a dense
    head, the middle of a streaming head's window."""
    u1, l2, hi, stream = bounds_ref[0], bounds_ref[1], bounds_ref[2], bounds_ref[3] != 0
    bk = cfg.block_k
    q_lo = cfg.q_offset + i * cfg.block_q
    q_hi = q_lo + cfg.block_q - 1
    whole_hi = jnp.clip(jnp.minimum((q_lo + 1) // bk if cfg.causal else cfg.nk, cfg.sk // bk), l2, hi)
    whole_lo = jnp.where(stream, jnp.clip((window_pos(q_hi, cfg.window_block) - cfg.local) // bk + 1, l2, whole_hi),
                         l2)
    masked = functools.partial(body, masked=True)
    carry = lax.fori_loop(0, u1, masked, carry)  # sink blocks (streaming heads only)
    carry = lax.fori_loop(l2, whole_lo, masked, carry)  # local-window edge
    carry = lax.fori_loop(whole_lo, whole_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(whole_hi, hi, masked, carry)  # diagonal and ragged end


def _triton_params(cfg: _Cfg, d: int) -> plgpu.CompilerParams:
    # 8 warps once a 128x128 tile meets a 128-wide head: 4 leave Hopper's tensor cores underfed.
    num_warps = cfg.num_warps or (8 if cfg.block_q * cfg.block_k >= 128 * 128 and d >= 128 else 4)
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=cfg.num_stages or 2)


def _pallas_gpu_forward(q, k, v, flags, cfg: _Cfg, interpret):
    """Returns the output [B, Sq, Hq, D] and the log-sum-exp [B, Hq, Sq_padded] (float32)."""
    b, sq, hq, d = q.shape
    g = hq // k.shape[2]
    bq, bk, nq, nk = cfg.block_q, cfg.block_k, cfg.nq, cfg.nk
    qp, kp, vp = _pad_seq(q, nq * bq), _pad_seq(k, nk * bk), _pad_seq(v, nk * bk)

    def kernel(bounds_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):
        i = pl.program_id(0)
        q_blk, stream = q_ref[...], bounds_ref[3] != 0
        qpos = cfg.q_offset + i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)

        def body(kb, carry, masked):
            kslice = pl.ds(kb * bk, bk)
            kpos = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            return _online_softmax_step(q_blk, k_ref[kslice, :], v_ref[kslice, :], *carry,
                                        qpos if masked else None, kpos, stream, cfg)

        carry = (jnp.full((bq, 1), MASK_VALUE, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
                 jnp.zeros((bq, d), jnp.float32))
        m, l_, acc = _gpu_kv_loops(bounds_ref, i, body, carry, cfg)
        safe_l = jnp.where(l_ == 0.0, 1.0, l_)
        o_ref[...] = (acc / safe_l).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(l_ == 0.0, 0.0, m + jnp.log(safe_l))[:, 0]

    q_spec = pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, i, h, 0))
    kv_spec = pl.BlockSpec((None, nk * bk, None, d), lambda i, b_, h: (b_, 0, h // g, 0))
    out, lse = pl.pallas_call(
        kernel, grid=(nq, b, hq),
        in_specs=[pl.BlockSpec((None, None, 4), lambda i, b_, h: (h // g, i, 0)), q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, b_, h: (b_, h, i))],
        out_shape=[jax.ShapeDtypeStruct((b, nq * bq, hq, d), q.dtype),
                   jax.ShapeDtypeStruct((b, hq, nq * bq), jnp.float32)],
        compiler_params=_triton_params(cfg, d), interpret=interpret, name="hybrid_attention_gpu",
    )(_gpu_bounds(flags, cfg), qp, kp, vp)
    return out[:, :sq], lse


def _pallas_gpu_backward(q, k, v, flags, out, lse, do, cfg: _Cfg, interpret):
    """Triton-style backward: dq per query block over its KV loops; dk/dv per (KV block, query head) over the
    contiguous range of query blocks that use it, summed over each GQA group afterwards."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    bq, bk, nq, nk = cfg.block_q, cfg.block_k, cfg.nq, cfg.nk
    qp, dop = _pad_seq(q, nq * bq), _pad_seq(do, nq * bq)
    kp, vp = _pad_seq(k, nk * bk), _pad_seq(v, nk * bk)
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), -1).transpose(0, 2, 1)  # [B, Hq, Sq]
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, nq * bq - sq)))

    def dq_kernel(bounds_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref):
        i = pl.program_id(0)
        q_blk, do_blk, stream = q_ref[...], do_ref[...], bounds_ref[3] != 0
        lse_blk, delta_blk = lse_ref[...][:, None], delta_ref[...][:, None]
        qpos = cfg.q_offset + i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)

        def body(kb, acc, masked):  # unmasked blocks leave NaN/inf only in padded query rows, sliced off
            kslice = pl.ds(kb * bk, bk)
            kpos = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            k_blk = k_ref[kslice, :]
            p = _probs(q_blk, k_blk, lse_blk, qpos if masked else None, kpos, stream, cfg)
            dp = lax.dot_general(do_blk, v_ref[kslice, :], (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_blk)).astype(k_blk.dtype)
            return acc + lax.dot_general(ds, k_blk, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

        acc = _gpu_kv_loops(bounds_ref, i, body, jnp.zeros((bq, d), jnp.float32), cfg)
        dq_ref[...] = (acc * cfg.scale).astype(dq_ref.dtype)

    q_spec = pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, i, h, 0))
    kv_full = pl.BlockSpec((None, nk * bk, None, d), lambda i, b_, h: (b_, 0, h // g, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b_, h: (b_, h, i))
    dq = pl.pallas_call(
        dq_kernel, grid=(nq, b, hq),
        in_specs=[pl.BlockSpec((None, None, 4), lambda i, b_, h: (h // g, i, 0)), q_spec, kv_full, kv_full, q_spec,
                  row_spec, row_spec],
        out_specs=q_spec, out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=_triton_params(cfg, d), interpret=interpret, name="hybrid_attention_dq_gpu",
    )(_gpu_bounds(flags, cfg), qp, kp, vp, dop, lse, delta)

    qranges, _ = _transposed_schedule(flags, cfg)
    qbounds = jnp.concatenate([qranges, jnp.broadcast_to(flags[:, None, None], qranges.shape[:2] + (1,)),
                               jnp.zeros_like(qranges[..., :1])], axis=-1)  # (qa, qb, streaming, 0)

    def dkv_kernel(qbounds_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref):
        kb = pl.program_id(0)
        k_blk, v_blk, stream = k_ref[...], v_ref[...], qbounds_ref[2] != 0
        kpos = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)

        def body(i, carry):
            dk, dv = carry
            qslice = pl.ds(i * bq, bq)
            q_blk, do_blk = q_ref[qslice, :], do_ref[qslice, :]
            qpos = cfg.q_offset + i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            p = _probs(q_blk, k_blk, lse_ref[qslice][:, None], qpos, kpos, stream, cfg)
            dv = dv + lax.dot_general(p.astype(do_blk.dtype), do_blk, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
            dp = lax.dot_general(do_blk, v_blk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_ref[qslice][:, None])).astype(q_blk.dtype)
            return dk + lax.dot_general(ds, q_blk, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32), dv

        zeros = jnp.zeros((bk, d), jnp.float32)
        dk, dv = lax.fori_loop(qbounds_ref[0], qbounds_ref[1], body, (zeros, zeros))
        dk_ref[...] = dk * cfg.scale
        dv_ref[...] = dv

    k_spec = pl.BlockSpec((None, bk, None, d), lambda kb, b_, h: (b_, kb, h // g, 0))
    q_full = pl.BlockSpec((None, nq * bq, None, d), lambda kb, b_, h: (b_, 0, h, 0))
    row_full = pl.BlockSpec((None, None, nq * bq), lambda kb, b_, h: (b_, h, 0))
    part_spec = pl.BlockSpec((None, bk, None, d), lambda kb, b_, h: (b_, kb, h, 0))
    part = jax.ShapeDtypeStruct((b, nk * bk, hq, d), jnp.float32)  # per query head, summed over groups below
    dk, dv = pl.pallas_call(
        dkv_kernel, grid=(nk, b, hq),
        in_specs=[pl.BlockSpec((None, None, 4), lambda kb, b_, h: (h // g, kb, 0)), q_full, k_spec, k_spec, q_full,
                  row_full, row_full],
        out_specs=[part_spec, part_spec], out_shape=[part, part],
        compiler_params=_triton_params(cfg, d), interpret=interpret, name="hybrid_attention_dkv_gpu",
    )(qbounds, qp, kp, vp, dop, lse, delta)
    group_sum = lambda x, like: x[:, : cfg.sk].reshape(b, cfg.sk, hkv, g, d).sum(3).astype(like.dtype)
    return dq[:, :sq], group_sum(dk, k), group_sum(dv, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _pallas_hybrid(q, k, v, flags, cfg: _Cfg, kernel: str, interpret: bool):
    """kernel: "tpu" (Mosaic-style, scalar prefetch) or "gpu" (Triton-style); both run in the interpreter too."""
    return _pallas_hybrid_fwd(q, k, v, flags, cfg, kernel, interpret)[0]


def _pallas_hybrid_fwd(q, k, v, flags, cfg, kernel, interpret):
    forward = _pallas_gpu_forward if kernel == "gpu" else _pallas_tpu_forward
    out, lse = forward(q, k, v, flags, cfg, interpret)
    return out, (q, k, v, flags, out, lse)


def _pallas_hybrid_bwd(cfg, kernel, interpret, res, g):
    q, k, v, flags, out, lse = res
    backward = _pallas_gpu_backward if kernel == "gpu" else _pallas_tpu_backward
    return (*backward(q, k, v, flags, out, lse, g, cfg, interpret), None)


_pallas_hybrid.defvjp(_pallas_hybrid_fwd, _pallas_hybrid_bwd)


def _default_block(n: int) -> int:
    return int(min(128, max(16, pl.next_power_of_2(n))))  # >= 16: Triton's dot minimum


def make_config(q, k, streaming_heads, *, sink, local, q_offset, scale, block_q, block_k, num_warps=None,
                num_stages=None, window_block=1, causal=True):
    """Validates the arguments of `hybrid_attention`; returns (int32 flags [Hkv], _Cfg)."""
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be [batch, seq, heads, head_dim], got {q.shape} and {k.shape}")
    b, sq, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {k.shape} does not match q {q.shape} in batch or head_dim")
    sk, hkv = k.shape[1], k.shape[2]
    check_gqa(hq, hkv)
    flags, static = check_streaming_heads(streaming_heads, hkv)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a Python bool (static), got {type(causal).__name__}")
    _check_non_causal(causal, static)
    sink, local = check_int("sink", sink, 0), check_int("local", local, 1)
    window_block = check_int("window_block", window_block, 1)
    sink, local = _round_up(sink, window_block), _round_up(local, window_block)
    q_offset = check_int("q_offset", q_offset, 0)
    if not causal and q_offset:
        raise ValueError(f"causal=False has no query positions: q_offset must be 0, got {q_offset}")
    if causal and q_offset + sq > sk:
        raise ValueError(f"q_offset + q_len ({q_offset} + {sq}) exceeds kv_len {sk}: queries need their own keys")
    block_q = _default_block(sq) if block_q is None else check_int("block_q", block_q, 1)
    block_k = _default_block(sk) if block_k is None else check_int("block_k", block_k, 1)
    static_t = None if static is None else tuple(bool(x) for x in static)
    num_warps = None if num_warps is None else check_int("num_warps", num_warps, 1)
    num_stages = None if num_stages is None else check_int("num_stages", num_stages, 1)
    return flags, _Cfg(sq, sk, q_offset, sink, local, default_scale(scale, d), block_q, block_k, static_t,
                       window_block, causal, num_warps, num_stages)


def hybrid_attention(q, k, v, *, streaming_heads, sink, local, q_offset=0, scale=None, implementation=None,
                     interpret=False, block_q=None, block_k=None, num_warps=None, num_stages=None, window_block=1,
                     causal=True):
    """Causal attention where streaming KV heads see only `sink` first tokens and a `local` window; or, with
    causal=False, plain dense attention (every key visible to every query; HART's attention over its KV cache).

    Args:
      q: [B, Sq, Hq, D]; k, v: [B, Sk, Hkv, D] with Hq % Hkv == 0 (GQA); float32 or bfloat16; any Sq, Sk.
      streaming_heads: bool [Hkv]. Concrete (numpy/list) flags split the heads statically, so streaming heads
        cost O(sink + local) per query; traced flags work too but the XLA path then masks a dense causal pass.
      sink, local: Python ints, sink >= 0, local >= 1. Key j is visible to query position p iff j <= p and,
        for streaming heads, (j < sink or p - j < local).
      window_block: 1 (token-exact, above) or the block of DuoAttention's training kernel (128): sink and local are
        rounded up to multiples of it and p - j < local is counted from the last position of p's block, so query
        block i sees sink blocks plus key blocks i - local/window_block + 1 .. i (causal); `hybrid_mask`.
      q_offset: position of query 0 (chunked prefill: Sk = q_offset + Sq); q_offset + Sq <= Sk.
      causal: False drops the causal rule: every key j < Sk is visible to every query, any Sq and Sk, q_offset 0.
        Dense heads only: a streaming head (or traced streaming_heads) raises ValueError.
      scale: softmax scale, default 1/sqrt(D).
      implementation: "pallas", "xla", "cudnn" (GPU: dense heads through cuDNN's fused attention, streaming
        heads through the Pallas kernel; needs concrete flags, bf16/fp16, D <= 128 in multiples of 8, and when
        causal q_offset 0 with Sq == Sk) or
        None: "cudnn" where it applies on a GPU, else Pallas on GPU/TPU and XLA elsewhere.
      interpret: run the Pallas kernel in the interpreter (CPU testing).
      block_q, block_k: block sizes (default min(128, next power of two of the length), at least 16).
      num_warps, num_stages: Triton launch parameters of the GPU kernels (default from the block shape).
    Returns:
      [B, Sq, Hq, D] in q.dtype. Differentiable w.r.t. q, k, v on every path.
    """
    flags, cfg = make_config(q, k, streaming_heads, sink=sink, local=local, q_offset=q_offset, scale=scale,
                             block_q=block_q, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                             window_block=window_block, causal=causal)
    if v.shape != k.shape:
        raise ValueError(f"v {v.shape} must have the shape of k {k.shape}")
    if implementation == "cudnn" or (implementation is None and not interpret and _cudnn_applies(q, cfg)):
        if not _cudnn_applies(q, cfg):
            raise ValueError("implementation='cudnn' needs a GPU, concrete streaming_heads, bfloat16/float16 "
                             "inputs, head_dim <= 128 (a multiple of 8) and, when causal, q_offset 0 with "
                             "q_len == kv_len")
        return _cudnn_hybrid(q, k, v, cfg)
    impl, flavour = resolve_implementation(implementation, interpret)
    if impl == "xla":
        return _xla_hybrid(q, k, v, flags, cfg)
    return _pallas_hybrid(q, k, v, flags, cfg, "gpu" if flavour == "gpu" else "tpu", flavour == "interpret")
