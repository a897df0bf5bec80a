"""Depthwise convolution and the GLU-MBConv core, shared by DC-AE (`jaxeff.dcae`) and SANA (`jaxeff.foreact`).

GLU-MBConv (EfficientViT `models/nn/ops.py` `GLUMBConv`; diffusers `GLUMBConv`): 1x1 conv C -> 2F, SiLU,
depthwise 3x3 conv, `value * SiLU(gate)` over the two channel halves, 1x1 conv F -> C. DC-AE wraps it in a
residual + RMSNorm2d, SANA's feed-forward uses it bare; both keep their own modules (and parameter names) and call
`glu_mbconv` with their weights. NHWC activations, HWIO weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def depthwise_conv_shifted(x: jax.Array, w: jax.Array) -> jax.Array:
    """'Same' depthwise kxk conv [B, H, W, C] x [k, k, 1, C] as k*k shifted multiply-adds that XLA fuses into one
    loop: XLA:CPU's grouped conv was 10-20x slower than this (and than torch) on DC-AE's 512px GLUMBConv shapes."""
    k, p = w.shape[0], w.shape[0] // 2
    h, wd = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    return sum(xp[:, i : i + h, j : j + wd] * w[i, j, 0] for i in range(k) for j in range(k))


def depthwise_conv(x: jax.Array, w: jax.Array, *, implementation: str | None = None) -> jax.Array:
    """'Same' (zero padding k // 2) stride-1 depthwise conv: x [B, H, W, C], w [k, k, 1, C] (odd k) -> [B, H, W, C].

    implementation: None = the shifted sum on CPU, XLA's grouped convolution elsewhere (GPU/TPU convolution
    libraries are fast at it); "shifted" or "xla" to force one. Raises ValueError on mismatched shapes."""
    if x.ndim != 4 or w.ndim != 4 or w.shape[0] != w.shape[1] or w.shape[0] % 2 == 0 or w.shape[2:] != (1, x.shape[3]):
        raise ValueError(f"depthwise_conv needs x [B, H, W, C] and w [k, k, 1, C] with odd k, got {x.shape}, {w.shape}")
    if implementation not in (None, "shifted", "xla"):
        raise ValueError(f"implementation must be None, 'shifted' or 'xla', got {implementation!r}")
    if implementation == "shifted" or (implementation is None and jax.default_backend() == "cpu"):
        return depthwise_conv_shifted(x, w)
    p = w.shape[0] // 2
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=x.shape[3])


def glu_mbconv(x: jax.Array, w_inverted: jax.Array, b_inverted: jax.Array | None, w_depth: jax.Array,
               b_depth: jax.Array | None, w_point: jax.Array, b_point: jax.Array | None = None) -> jax.Array:
    """The GLU-MBConv core, no residual or norm: 1x1 -> SiLU -> depthwise 3x3 -> value * SiLU(gate) -> 1x1.

    Args:
      x: [B, H, W, C].
      w_inverted: [1, 1, C, 2F] (HWIO), b_inverted: [2F] or None; w_depth: [3, 3, 1, 2F], b_depth: [2F] or None;
      w_point: [1, 1, F, C_out], b_point: [C_out] or None. The first F channels after the depthwise conv are the
      value, the last F the gate (torch's `chunk(2, dim=1)`).
    Returns:
      [B, H, W, C_out] in the dtype the matmuls give (x's for matching dtypes).
    The 1x1 convs run as plain `x @ w` (XLA:CPU runs these faster than its conv path), the depthwise conv as
    `depthwise_conv` (shifted sum on CPU), the gate as `pallas_kernels.glu_silu` (one fused Pallas pass on GPU/TPU,
    XLA elsewhere; computed in float32 and cast back). Raises ValueError on mismatched weight shapes."""
    c, f2 = x.shape[-1], w_inverted.shape[-1]
    if (w_inverted.shape != (1, 1, c, f2) or f2 % 2 or w_depth.shape != (3, 3, 1, f2)
            or w_point.shape[:3] != (1, 1, f2 // 2)):
        raise ValueError(f"glu_mbconv weights must be [1, 1, {c}, 2F], [3, 3, 1, 2F], [1, 1, F, C_out] for x "
                         f"{x.shape}; got {w_inverted.shape}, {w_depth.shape}, {w_point.shape}")
    from pallas_kernels import glu_silu  # lazily, as jaxeff.nn.attention: `import jaxeff.nn` stays light

    add = lambda y, bias: y if bias is None else y + bias
    y = jax.nn.silu(add(x @ w_inverted[0, 0], b_inverted))
    y = add(depthwise_conv(y, w_depth), b_depth)
    return add(glu_silu(y) @ w_point[0, 0], b_point)
