"""DC-AE configurations: one frozen dataclass whose fields follow diffusers' `AutoencoderDC` config.json, plus the
released architectures by name (mit-han-lab/efficientvit `dc_ae.py`, scaling factors from the diffusers
conversion script)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORM_TYPES = ("rms_norm", "batch_norm")
ACT_FNS = ("relu", "silu", "relu6")


@dataclasses.dataclass(frozen=True)
class DCAEConfig:
    """Architecture of one DC-AE. Per-stage tuples run from the highest resolution (stage 0) to the latent side.

    `downsample_shortcut` / `upsample_shortcut` switch the residual-autoencoding shortcuts of the stage transitions
    (always on in the released models; off gives the "plain" autoencoder of the paper's ablation)."""

    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    encoder_block_types: tuple[str, ...] = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    decoder_block_types: tuple[str, ...] = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple[int, ...] = (0, 4, 8, 2, 2, 2)
    decoder_layers_per_block: tuple[int, ...] = (0, 5, 10, 2, 2, 2)
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((),) * 6
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((),) * 6
    upsample_block_type: str = "pixel_shuffle"  # or "interpolate" (nearest x2 then conv)
    downsample_block_type: str = "pixel_unshuffle"  # or "conv" (stride-2 conv)
    decoder_norm_types: tuple[str, ...] = ("batch_norm",) * 3 + ("rms_norm",) * 3
    decoder_act_fns: tuple[str, ...] = ("relu",) * 3 + ("silu",) * 3
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 1.0
    downsample_shortcut: bool = True
    upsample_shortcut: bool = True

    def __post_init__(self):
        n = len(self.encoder_block_out_channels)
        per_stage = {
            "encoder_block_types": self.encoder_block_types,
            "encoder_layers_per_block": self.encoder_layers_per_block,
            "encoder_qkv_multiscales": self.encoder_qkv_multiscales,
            "decoder_block_out_channels": self.decoder_block_out_channels,
            "decoder_block_types": self.decoder_block_types,
            "decoder_layers_per_block": self.decoder_layers_per_block,
            "decoder_qkv_multiscales": self.decoder_qkv_multiscales,
            "decoder_norm_types": self.decoder_norm_types,
            "decoder_act_fns": self.decoder_act_fns,
        }
        for name, value in per_stage.items():
            if len(value) != n:
                raise ValueError(f"DCAEConfig.{name} has {len(value)} entries, expected {n} (one per stage)")
        for name in ("encoder_block_types", "decoder_block_types"):
            bad = [b for b in getattr(self, name) if b not in BLOCK_TYPES]
            if bad:
                raise ValueError(f"DCAEConfig.{name}: unknown block types {bad}; known: {BLOCK_TYPES}")
        if bad := [t for t in self.decoder_norm_types if t not in NORM_TYPES]:
            raise ValueError(f"DCAEConfig.decoder_norm_types: unknown {bad}; known: {NORM_TYPES}")
        if bad := [a for a in (*self.decoder_act_fns, self.decoder_conv_act_fn) if a not in ACT_FNS]:
            raise ValueError(f"DCAEConfig: unknown activations {bad}; known: {ACT_FNS}")
        if self.upsample_block_type not in ("pixel_shuffle", "interpolate"):
            raise ValueError(f"DCAEConfig.upsample_block_type={self.upsample_block_type!r}: pixel_shuffle|interpolate")
        if self.downsample_block_type not in ("pixel_unshuffle", "conv"):
            raise ValueError(f"DCAEConfig.downsample_block_type={self.downsample_block_type!r}: pixel_unshuffle|conv")
        for side in ("encoder", "decoder"):
            widths = getattr(self, f"{side}_block_out_channels")
            types = getattr(self, f"{side}_block_types")
            depths = getattr(self, f"{side}_layers_per_block")
            for i, (w, t, d) in enumerate(zip(widths, types, depths)):
                if t == "EfficientViTBlock" and d > 0 and w % self.attention_head_dim:
                    raise ValueError(f"{side} stage {i}: width {w} not divisible by head dim {self.attention_head_dim}")
            if any(d == 0 for d in depths[1:-1]):
                raise ValueError(f"{side}_layers_per_block={depths}: a middle stage without blocks also skips its "
                                 "x2 resampling; only the first and last stage may have 0 blocks")
            for i in range(n - 1):
                if depths[i] > 0 and (4 * widths[i]) % widths[i + 1]:
                    raise ValueError(f"{side} stage {i}: 4*{widths[i]} channels not divisible by {widths[i + 1]}")
            if depths[0] == 0 and ((self.downsample_block_type == "pixel_unshuffle") and widths[1] % 4):
                raise ValueError(f"{side}: pixel-unshuffle input projection needs width {widths[1]} divisible by 4")
        if self.encoder_out_shortcut and self.encoder_block_out_channels[-1] % self.latent_channels:
            raise ValueError("encoder_out_shortcut: last encoder width must be a multiple of latent_channels")
        if self.decoder_in_shortcut and self.decoder_block_out_channels[-1] % self.latent_channels:
            raise ValueError("decoder_in_shortcut: last decoder width must be a multiple of latent_channels")

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> DCAEConfig:
        """From a diffusers `AutoencoderDC` config.json dict (string fields broadcast to every stage)."""
        if config.get("_class_name", "AutoencoderDC") != "AutoencoderDC":
            raise ValueError(f"config.json describes a {config['_class_name']}, not an AutoencoderDC")
        d = {k: v for k, v in config.items() if not k.startswith("_")}
        if "block_out_channels" in d:  # older configs share one width list
            d.setdefault("encoder_block_out_channels", d["block_out_channels"])
            d.setdefault("decoder_block_out_channels", d.pop("block_out_channels"))
        defaults = _DIFFUSERS_DEFAULTS
        n = len(d.get("encoder_block_out_channels", defaults["encoder_block_out_channels"]))
        out: dict[str, Any] = {}
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"config.json has fields this port does not know: {sorted(unknown)}")
        for name in fields:
            value = d.get(name, defaults.get(name))
            if value is None:
                continue
            if name in _PER_STAGE_STR and isinstance(value, str):
                value = (value,) * n
            if isinstance(value, list | tuple):
                value = tuple(tuple(v) if isinstance(v, list | tuple) else v for v in value)
            out[name] = value
        return cls(**out)

    def to_diffusers(self) -> dict[str, Any]:
        """config.json contents for diffusers `AutoencoderDC` (our extra shortcut switches must be on)."""
        if not (self.downsample_shortcut and self.upsample_shortcut):
            raise ValueError("diffusers AutoencoderDC always has stage shortcuts; this config turns them off")
        d = dataclasses.asdict(self)
        del d["downsample_shortcut"], d["upsample_shortcut"]
        return {"_class_name": "AutoencoderDC", **{k: _listify(v) for k, v in d.items()}}


def _listify(v):
    return [_listify(x) for x in v] if isinstance(v, tuple) else v


_PER_STAGE_STR = ("encoder_block_types", "decoder_block_types", "decoder_norm_types", "decoder_act_fns")
# AutoencoderDC.__init__ defaults, for config.json files that omit a field.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "latent_channels": 32,
    "attention_head_dim": 32,
    "encoder_block_types": "ResBlock",
    "decoder_block_types": "ResBlock",
    "encoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "decoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "encoder_layers_per_block": (2, 2, 2, 3, 3, 3),
    "decoder_layers_per_block": (3, 3, 3, 3, 3, 3),
    "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "upsample_block_type": "pixel_shuffle",
    "downsample_block_type": "pixel_unshuffle",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "encoder_out_shortcut": True,
    "decoder_in_shortcut": True,
    "decoder_conv_act_fn": "relu",
    "scaling_factor": 1.0,
}


def _f_config(widths: tuple[int, ...], latent: int, scaling_factor: float) -> DCAEConfig:
    n = len(widths)
    blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * (n - 3)
    return DCAEConfig(
        latent_channels=latent,
        encoder_block_types=blocks,
        decoder_block_types=blocks,
        encoder_block_out_channels=widths,
        decoder_block_out_channels=widths,
        encoder_layers_per_block=(0, 4, 8) + (2,) * (n - 3),
        decoder_layers_per_block=(0, 5, 10) + (2,) * (n - 3),
        encoder_qkv_multiscales=((),) * n,
        decoder_qkv_multiscales=((),) * n,
        decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * (n - 3),
        decoder_act_fns=("relu",) * 3 + ("silu",) * (n - 3),
        scaling_factor=scaling_factor,
    )


def _sana_config() -> DCAEConfig:
    blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    scales = ((),) * 3 + ((5,),) * 3
    return DCAEConfig(
        latent_channels=32,
        encoder_block_types=blocks,
        decoder_block_types=blocks,
        encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
        decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
        encoder_qkv_multiscales=scales,
        decoder_qkv_multiscales=scales,
        upsample_block_type="interpolate",
        downsample_block_type="conv",
        decoder_norm_types=("rms_norm",) * 6,
        decoder_act_fns=("silu",) * 6,
        scaling_factor=0.41407,
    )


_F32, _F64 = (128, 256, 512, 512, 1024, 1024), (128, 256, 512, 512, 1024, 1024, 2048)
_F128 = (*_F64, 2048)

# Released checkpoints: original format at hf.co/mit-han-lab/<name>, diffusers format at <name>-diffusers.
CONFIGS: dict[str, DCAEConfig] = {
    "dc-ae-f32c32-in-1.0": _f_config(_F32, 32, 0.3189),
    "dc-ae-f32c32-mix-1.0": _f_config(_F32, 32, 0.4552),
    "dc-ae-f64c128-in-1.0": _f_config(_F64, 128, 0.2889),
    "dc-ae-f64c128-mix-1.0": _f_config(_F64, 128, 0.4538),
    "dc-ae-f128c512-in-1.0": _f_config(_F128, 512, 0.4883),
    "dc-ae-f128c512-mix-1.0": _f_config(_F128, 512, 0.3620),
    "dc-ae-f32c32-sana-1.0": _sana_config(),
    "dc-ae-f32c32-sana-1.1": _sana_config(),
}


def get_config(name: str) -> DCAEConfig:
    """A released architecture by name, with or without the `mit-han-lab/` prefix and `-diffusers` suffix."""
    key = name.rsplit("/", 1)[-1].removesuffix("-diffusers")
    if key not in CONFIGS:
        raise ValueError(f"unknown DC-AE config {name!r}; known: {sorted(CONFIGS)}")
    return CONFIGS[key]
