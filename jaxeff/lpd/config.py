"""LPD configuration (frozen) and the released model sizes (mit-han-lab/lpd `models/lpd.py` factories)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class LPDConfig:
    """The flexible parallelized AR decoder. `grid_size` is the token grid side (img_size / 16 for the VQ-f16),
    so N = grid_size**2 tokens; `pos_embed` has N + 1 rows (row 0 is the class slot)."""

    dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    vocab_size: int = 16384
    num_classes: int = 1000
    grid_size: int = 16
    label_drop_prob: float = 0.1
    proj_dropout: float = 0.1  # live after attn.proj, after the GELU and after fc2 (attention dropout never runs)
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        for name in ("dim", "depth", "num_heads", "vocab_size", "num_classes", "grid_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.label_drop_prob < 1.0 or not 0.0 <= self.proj_dropout < 1.0:
            raise ValueError("label_drop_prob and proj_dropout must lie in [0, 1)")

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)


_SIZES = {"l": (1024, 24, 16), "xl": (1280, 36, 20), "xxl": (1536, 48, 24)}


def preset(name: str, **overrides) -> LPDConfig:
    """`lpd_l_256`, `lpd_xl_256`, `lpd_xxl_256`, `lpd_l_512`, `lpd_xl_512` (the released checkpoints'
    names, also accepted without the `lpd_` prefix); 256px -> 16x16 tokens, 512px -> 32x32."""
    key = name.lower().removeprefix("lpd_")
    size, _, res = key.partition("_")
    if size not in _SIZES or res not in ("256", "512"):
        raise ValueError(f"unknown LPD preset {name!r}; use lpd_{{l,xl,xxl}}_{{256,512}}")
    dim, depth, heads = _SIZES[size]
    return LPDConfig(dim=dim, depth=depth, num_heads=heads, grid_size=int(res) // 16, **overrides)


PRESETS = ("lpd_l_256", "lpd_xl_256", "lpd_xxl_256", "lpd_l_512", "lpd_xl_512")
