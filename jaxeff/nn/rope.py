"""Rotary position embeddings (the rotate-half convention of Llama / Qwen2 / Mistral checkpoints).

Frequencies follow transformers' `modeling_rope_utils` for the rope types a static position -> angle map can
express: "default", "linear", "llama3" and "yarn". "dynamic" and "longrope" re-derive the frequencies from the
length of each forward call (transformers keeps that as module state across calls), and a partial rotary factor
breaks the Llama / Mistral / Qwen2 modeling code itself; those are refused by name.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Keys of a rope dict that are not scaling parameters (the v5 `rope_parameters` dict carries rope_theta too).
_NOT_SCALING = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """`rope_scaling` (transformers < 5) / `rope_parameters` (>= 5) of a Hugging Face config.

    linear: factor. llama3: factor, low/high_freq_factor, original_max_position_embeddings. yarn: factor,
    original_max_position_embeddings, beta_fast, beta_slow, optional mscale / mscale_all_dim / attention_factor
    (the cos/sin multiplier), truncate.
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    @classmethod
    def from_hf(cls, d: dict | None, max_position_embeddings: int = 8192) -> RopeScaling | None:
        """None for plain RoPE. `max_position_embeddings` is transformers' default for a missing
        original_max_position_embeddings (and, for yarn, a missing factor is their ratio)."""
        if not d:
            return None
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_scaling type {rope_type!r} (supported: {SUPPORTED_ROPE_TYPES}; "
                             "'dynamic' and 'longrope' change the frequencies with each call's length)")
        partial = d.get("partial_rotary_factor", 1.0)
        if partial is not None and partial != 1.0:
            raise ValueError(f"partial_rotary_factor={partial} is not supported (rotary on the whole head only)")
        if rope_type == "default":
            return None
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields and k not in _NOT_SCALING and v is not None}
        kw.setdefault("original_max_position_embeddings", max_position_embeddings)
        if rope_type == "yarn" and d.get("factor") is None:
            kw["factor"] = max_position_embeddings / kw["original_max_position_embeddings"]
        if "factor" not in kw:
            raise ValueError(f"rope_scaling of type {rope_type!r} needs a 'factor'")
        kw["beta_fast"] = kw.get("beta_fast") or 32.0  # transformers: `or` (0 means the default)
        kw["beta_slow"] = kw.get("beta_slow") or 1.0
        return cls(rope_type=rope_type, **kw)

    def to_hf(self) -> dict:
        keys = {
            "linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                     "mscale_all_dim", "attention_factor", "truncate"),
        }[self.rope_type]
        return {"rope_type": self.rope_type} | {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    @property
    def attention_scaling(self) -> float:
        """Multiplier of cos and sin (yarn's attention factor; 1 for the other types)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return float(mscale(self.factor, self.mscale) / mscale(self.factor, self.mscale_all_dim))
        return mscale(self.factor)


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Per-pair inverse frequencies [head_dim // 2] (float64 numpy, so they are exact before the cast)."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv
    if scaling.rope_type == "linear":
        return inv / scaling.factor
    if scaling.rope_type == "yarn":
        return _yarn(inv, head_dim, theta, scaling)
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def _yarn(inv: np.ndarray, dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    """YaRN (arXiv 2309.00071): interpolate (inv / factor) the low frequencies, keep the high ones, with a linear
    ramp between the dimensions that turn beta_fast and beta_slow times over original_max_position_embeddings."""

    def correction_dim(rotations):
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp
    return inv / s.factor * (1 - extrapolate) + inv * extrapolate


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: jnp.ndarray | np.ndarray,
               attention_scaling: float = 1.0) -> jnp.ndarray:
    """Rotate x [B, S, H, D] by positions [B, S] (any integers: offsets, ragged batches); cos and sin are
    multiplied by `attention_scaling` (`RopeScaling.attention_scaling`)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, S, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    if attention_scaling != 1.0:
        cos, sin = cos * attention_scaling, sin * attention_scaling
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
