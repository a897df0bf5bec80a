"""Reconstruct sample images with a released DC-AE checkpoint and report PSNR / SSIM (+ LPIPS-AlexNet with
`lpips_weights=<local file>`, see jaxeff/dcae/perceptual.py), computed as the official evaluator does.

`make exp name=dcae_f32c32 ckpt=/path/to/dc-ae-f32c32-in-1.0-diffusers` (a diffusers directory) or
`ckpt=/path/to/dc-ae-f32c32-in-1.0` (an original-format directory with model.safetensors; `model=` names the
variant when the directory name does not), or a Hub name, `ckpt=hf:mit-han-lab/dc-ae-f32c32-in-1.0-diffusers`
(downloaded once by `jaxeff.io.hub`). Siblings: dcae_f64c128, dcae_f128c512, dcae_f32c32_sana.
Reference (efficientvit README, ImageNet-512 val, f64c128-in): PSNR 26.15, SSIM 0.711, LPIPS 0.080; our images are
the few scikit-image / scikit-learn samples, so numbers are indicative only.

Multi-process: every process reconstructs the same images on its own first device (nothing sharded), and process 0
writes the run directory. Run on: 1 CPU device.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxeff.dcae import DCAE, WHERE_TO_GET, get_config, jit_method
from jaxeff.dcae.data import ALL_IMAGES, center_crop, load_image, to_signed, to_uint8
from jaxeff.dcae.metrics import reconstruction_metrics
from jaxeff.dcae.perceptual import load_lpips_weights
from jaxeff.experiment import Run, register
from jaxeff.io import hub

_DEFAULTS = {"dcae_f32c32": "dc-ae-f32c32-in-1.0", "dcae_f64c128": "dc-ae-f64c128-in-1.0",
             "dcae_f128c512": "dc-ae-f128c512-in-1.0", "dcae_f32c32_sana": "dc-ae-f32c32-sana-1.1"}


def _experiment_for(model: str) -> str:
    return "dcae_" + model.split("-")[2] + ("_sana" if "sana" in model else "")


@dataclasses.dataclass(frozen=True)
class Config:
    ckpt: str | None = None
    model: str = "dc-ae-f32c32-in-1.0"  # variant name, used for original-format weights
    resolution: int = 512
    images: tuple[str, ...] = ALL_IMAGES
    batch: int = 1
    lpips_weights: str | None = None  # local LPIPS-AlexNet safetensors file: adds the evaluator's LPIPS column

    def validate(self):
        family = get_config(self.model)  # raises on an unknown name
        if self.ckpt is None:
            raise ValueError(
                f"no checkpoint given. Download one and pass it as ckpt=..., e.g. "
                f"`make exp name={_experiment_for(self.model)} ckpt=/path/to/{self.model}-diffusers`. "
                f"{WHERE_TO_GET}"
            )
        if hub.is_hub_name(self.ckpt):
            hub.parse(self.ckpt)  # a malformed name fails here; the download happens in the run
        elif not Path(self.ckpt).exists():
            raise FileNotFoundError(f"ckpt={self.ckpt} does not exist. {WHERE_TO_GET}")
        if self.resolution % family.spatial_compression:
            raise ValueError(f"resolution {self.resolution} must be a multiple of {family.spatial_compression}")
        if self.lpips_weights is not None and not Path(self.lpips_weights).exists():
            raise FileNotFoundError(f"lpips_weights={self.lpips_weights} does not exist")
        unknown = set(self.images) - set(ALL_IMAGES)
        if unknown:
            raise ValueError(f"unknown images {sorted(unknown)}; known: {ALL_IMAGES}")


def reconstruct(cfg: Config, run: Run) -> None:
    """Encode/decode sample images with a released DC-AE checkpoint; PSNR/SSIM(/LPIPS) table and comparison figure."""
    import matplotlib.pyplot as plt

    family = get_config(cfg.model)
    # a Hub name carries its own architecture (config.json, else the repo name); a bare local file needs model=
    own_config = hub.is_hub_name(cfg.ckpt) or Path(cfg.ckpt, "config.json").exists()
    model = DCAE.from_pretrained(cfg.ckpt, config=None if own_config else cfg.model)
    mc = model.config
    if (mc.spatial_compression, mc.latent_channels) != (family.spatial_compression, family.latent_channels):
        raise ValueError(
            f"{cfg.ckpt} is an f{mc.spatial_compression}c{mc.latent_channels} model, but this experiment is for "
            f"f{family.spatial_compression}c{family.latent_channels} ({cfg.model})"
        )
    encode, decode = jit_method(model, "encode"), jit_method(model, "decode")
    originals = [center_crop(load_image(n), cfg.resolution) for n in cfg.images]
    recons, rows, latent_std = [], [], []
    start = time.time()
    for i in run.progress(range(0, len(originals), cfg.batch), desc="reconstruct"):
        x = np.stack([to_signed(im) for im in originals[i : i + cfg.batch]])
        z = encode(jnp.asarray(x))
        latent_std.append(float(jnp.std(z)))
        recons += list(np.asarray(decode(z)))
    seconds = time.time() - start
    lpips = None if cfg.lpips_weights is None else load_lpips_weights(cfg.lpips_weights, net="alex")
    for name, orig, rec in zip(cfg.images, originals, recons):
        rows.append({"image": name, **reconstruction_metrics(rec[None], to_signed(orig)[None], lpips)})
        run.log(len(rows), image=name, **{k.lower(): v for k, v in rows[-1].items() if k != "image"})
    rows.append({"image": "mean", **{k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "image"}})
    latent = (cfg.resolution // mc.spatial_compression,) * 2 + (mc.latent_channels,)
    run.results(
        rows,
        title=f"{cfg.model} reconstruction at {cfg.resolution}x{cfg.resolution}",
        note=(f"checkpoint {cfg.ckpt}; latent {latent}; latent std {np.mean(latent_std):.3f} (x scaling_factor "
              f"{mc.scaling_factor} = {np.mean(latent_std) * mc.scaling_factor:.3f}); {seconds:.1f}s for "
              f"{len(originals)} images incl. compilation. Metrics as the official evaluator computes them "
              "(uint8; SSIM with torchmetrics' 11x11 Gaussian window; LPIPS-AlexNet)."),
    )
    fig, axes = plt.subplots(2, len(originals), figsize=(2.2 * len(originals), 4.6), squeeze=False)
    for j, (name, orig, rec) in enumerate(zip(cfg.images, originals, recons)):
        axes[0, j].imshow(orig)
        axes[1, j].imshow(to_uint8(rec))
        axes[0, j].set_title(name, fontsize=8)
        axes[1, j].set_title(f"{rows[j]['PSNR']:.2f} dB", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    run.savefig(fig, "reconstructions.png")


_SMOKE = {"resolution": 256, "images": ("coffee", "chelsea")}
for _exp, _model in _DEFAULTS.items():
    register(_exp, Config, presets={"smoke": {**_SMOKE, "model": _model}, "full": {"model": _model}},
             description=f"reconstruct sample images with a local {_model} checkpoint (ckpt=...)")(reconstruct)
