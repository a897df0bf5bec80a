"""ForeAct's SANA image-edit transformer configuration (frozen) and its presets.

Field names follow the diffusers `SanaTransformer2DModel` config (`transformer/config.json`), so
`SanaConfig.from_diffusers(json.load(...))` reads a released config; fields jaxeff does not implement are refused
there (`qk_norm`, `guidance_embeds`, a patch size other than 1, a positional embedding).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SanaConfig:
    """SANA DiT sizes. Self-attention width D = num_attention_heads * attention_head_dim; the cross-attention uses
    num_cross_attention_heads * cross_attention_head_dim (= D in every released model) and attends to captions
    projected from `caption_channels` to D. `num_views` > 1 adds ForeAct's view embedding [num_views, D]."""

    in_channels: int = 32
    out_channels: int = 32
    num_layers: int = 20
    num_attention_heads: int = 70
    attention_head_dim: int = 32
    num_cross_attention_heads: int = 20
    cross_attention_head_dim: int = 112
    cross_attention_dim: int = 2240
    caption_channels: int = 2304
    mlp_ratio: float = 2.5
    norm_eps: float = 1e-6
    caption_norm_eps: float = 1e-5
    linear_attn_eps: float = 1e-15
    num_views: int = 1

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "num_layers", "num_attention_heads", "attention_head_dim",
                     "num_cross_attention_heads", "cross_attention_head_dim", "caption_channels", "num_views"):
            if getattr(self, name) < 1:
                raise ValueError(f"SanaConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_cross_attention_heads * self.cross_attention_head_dim != self.inner_dim:
            raise ValueError(f"cross-attention width {self.num_cross_attention_heads}x{self.cross_attention_head_dim}"
                             f" must equal the self-attention width {self.inner_dim} (as in every SANA model)")
        if self.cross_attention_dim != self.inner_dim:
            raise ValueError(f"cross_attention_dim {self.cross_attention_dim} must equal the width {self.inner_dim}: "
                             "the caption projection maps the text to the model width")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def ffn_hidden(self) -> int:
        return int(self.mlp_ratio * self.inner_dim)

    @classmethod
    def from_diffusers(cls, d: dict, num_views: int = 1) -> SanaConfig:
        """From a diffusers `SanaTransformer2DModel` config dict; raises ValueError for a feature jaxeff does not
        implement (the SANA-Sprint guidance embedding, qk-norm, patch size != 1, a positional embedding,
        affine block norms, attention biases in the linear attention)."""
        refused = {"qk_norm": None, "guidance_embeds": False, "patch_size": 1, "interpolation_scale": None,
                   "norm_elementwise_affine": False, "attention_bias": False}
        bad = {k: d[k] for k, ok in refused.items() if k in d and d[k] != ok}
        if bad:
            raise ValueError(f"unsupported SANA config values {bad} (jaxeff implements {refused})")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields}, num_views=num_views)


# Efficient-Large-Model/Sana_1600M_512px_diffusers transformer/config.json, the DiT ForeAct fine-tunes
SANA_1600M_512 = SanaConfig()

PRESETS = {"1600M-512": SANA_1600M_512}


def preset(name: str, **overrides) -> SanaConfig:
    """A named SANA configuration (`"1600M-512"`), with dataclass overrides; ValueError names the known presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown SANA preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
