"""ReLU linear attention, shared by DC-AE's `LiteMLA` and SANA's / ForeAct's self-attention.

EfficientViT / SANA replace softmax by a ReLU kernel, so attention factorises and costs O(N D E) instead of
O(N M D): official efficientvit `models/nn/ops.py` `LiteMLA.relu_linear_att` (V padded with a ones row, the
normaliser read off the last channel), diffusers `SanaMultiscaleAttnProcessor2_0.apply_linear_attention` and
`SanaLinearAttnProcessor2_0`, which compute the same sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def relu_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, eps: float = 1e-15, *,
                          precision: str = "float32") -> jax.Array:
    """out_n = sum_m (k'_m . q'_n) v_m / (sum_m k'_m . q'_n + eps), q' = relu(q), k' = relu(k), no 1/sqrt(d).

    Computed as kv = sum_m k'_m v_m^T [B, H, D, E], num = q' kv, den = q' . sum_m k'_m.
    `precision` says in which dtype:
    - "float32" (default): everything in float32 whatever the input dtype, as diffusers'
      `SanaMultiscaleAttnProcessor2_0` / `SanaLinearAttnProcessor2_0` (they upcast before the matmuls); SANA's and
      ForeAct's generator use it.
    - "efficientvit": as the official `LiteMLA.relu_linear_att` (efficientvit `models/nn/ops.py`, autocast off):
      float16 inputs are upcast to float32 for everything; bfloat16 inputs run both matmuls in bfloat16 (V padded
      with a ones row, so the normaliser is a bfloat16 matmul output too) and only the division in float32;
      float32 stays float32. DC-AE uses it unless told to keep float32 (`DCAE(fp32_attention=True)`).

    Args:
      q: [B, N, H, D] queries (before the ReLU); k: [B, M, H, D] keys (before the ReLU); v: [B, M, H, E] values.
      eps: added to the normaliser (1e-15 in EfficientViT / DC-AE and SANA); a query whose ReLU features meet no
        key gets `0 / eps = 0`.
      precision: "float32" or "efficientvit" (above).
    Returns:
      [B, N, H, E] float32 (callers cast back).
    Raises:
      ValueError if the ranks, batch, head or key-length axes do not match, or for an unknown `precision`.
    """
    if precision not in ("float32", "efficientvit"):
        raise ValueError(f"precision must be 'float32' or 'efficientvit', got {precision!r}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, N, H, D], [B, M, H, D], [B, M, H, E]; got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    b, _, h, d = q.shape
    if k.shape != (b, v.shape[1], h, d) or (v.shape[0], v.shape[2]) != (b, h):
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: batch, heads and key lengths must match and k "
                         "must have q's feature size")
    dtype = jnp.result_type(q, k, v)
    if precision == "efficientvit" and dtype == jnp.bfloat16:
        q, k, v = jax.nn.relu(q.astype(dtype)), jax.nn.relu(k.astype(dtype)), v.astype(dtype)
        v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)  # the ones row: its output is the normaliser
        out = jnp.einsum("bnhd,bhde->bnhe", q, jnp.einsum("bmhd,bmhe->bhde", k, v)).astype(jnp.float32)
        return out[..., :-1] / (out[..., -1:] + eps)
    q = jax.nn.relu(q.astype(jnp.float32))
    k = jax.nn.relu(k.astype(jnp.float32))
    v = v.astype(jnp.float32)
    kv = jnp.einsum("bmhd,bmhe->bhde", k, v)
    num = jnp.einsum("bnhd,bhde->bnhe", q, kv)
    den = jnp.einsum("bnhd,bhd->bnh", q, k.sum(axis=1))
    return num / (den[..., None] + eps)
