"""Decoupled high-resolution adaptation (DC-AE paper, Sec. 3.3) as a three-phase trainer with optax masks.

Phase 1: every layer, low-resolution crops, reconstruction loss. Phase 2: only the latent-side layers (last encoder
stage + encoder output conv, decoder input conv + first decoder stage: the EfficientViT stages that see the
latent-size token count) at high resolution. Phase 3: only the decoder head (last decoder stage, output norm and
conv) at low resolution with a hinge GAN loss against a PatchGAN discriminator.

The reconstruction loss defaults to the maintainers' description, L1 + perceptual (efficientvit #143), as
L1 + 0.25 LPIPS-VGG16 (the weight is a third-party reading), which needs a local LPIPS-VGG weights file
(`lpips_weights=`, see jaxeff/dcae/perceptual.py); `loss=l1` or `l1+mse` run without one (the smoke preset uses
`l1`, as no LPIPS weights can be had offline). The decoder's ResBlock stages use BatchNorm + ReLU as the released
in/mix models (`decoder_norm=batch_norm`; `rms_norm` gives the sana pattern); BatchNorm layers of the trained
layers run in training mode, those of frozen layers keep their running statistics. The official training code is
not public; which layers count as "middle" / "head", the GAN and all weights are our reading (efficientvit #168).
Reports the official PSNR / SSIM (+ LPIPS-AlexNet with `metric_lpips_weights=`) of whole held-out images at low and
high resolution after each phase. Ran on CPU.

Data parallel over `Run.mesh`: parameters, BatchNorm statistics, discriminator and optimiser states are replicated
global arrays; each global batch is drawn alike on every process and each feeds its rows
(`jaxeff.distributed.shard_global_batch`); devices that `batch_low` and `batch_high` do not both divide among
sit out (`Run.data_mesh` of their gcd).
Run on: 1 CPU device; 2 processes x 2 CPU devices on one machine (by hand, tiny sizes, `loss=l1`, batch_high 2:
data parallel over one device of each process).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxeff.dcae import DCAEConfig
from jaxeff.dcae.data import TEST_IMAGES, TRAIN_IMAGES, CropSampler, load_image, resize_to, to_signed
from jaxeff.dcae.metrics import reconstruction_metrics
from jaxeff.dcae.perceptual import load_lpips_weights
from jaxeff.dcae.training import (
    LPIPS_LOSS_WEIGHT,
    init_model,
    l1_loss,
    l1_lpips_loss,
    l1_mse_loss,
    make_recon,
    make_step,
    set_norm_modes,
)
from jaxeff.distributed import replicate, shard_global_batch, to_host
from jaxeff.experiment import Run, register


@dataclasses.dataclass(frozen=True)
class Config:
    seeds: int = 1
    base_width: int = 32
    low_res: int = 64
    high_res: int = 256
    steps1: int = 4000
    steps2: int = 1000
    steps3: int = 1000
    batch_low: int = 16
    batch_high: int = 4
    lr1: float = 1e-3
    lr2: float = 3e-4
    lr3: float = 1e-4
    gan_weight: float = 0.1
    disc_width: int = 32
    decoder_norm: str = "batch_norm"  # of the decoder's ResBlock stages: batch_norm (in/mix) | rms_norm (sana)
    loss: str = "l1+lpips"  # reconstruction loss: l1+lpips (maintainers' description) | l1 | l1+mse
    lpips_weights: str | None = None  # local LPIPS-VGG16 safetensors file for the loss (jaxeff/dcae/perceptual.py)
    lpips_weight: float = LPIPS_LOSS_WEIGHT
    metric_lpips_weights: str | None = None  # local LPIPS-AlexNet file: adds the evaluator's LPIPS column
    test_low: tuple[int, int] = (64, 96)  # whole test images resized to these (H, W)
    test_high: tuple[int, int] = (256, 384)

    def validate(self):
        autoencoder_config(self)
        if self.loss not in _LOSSES:
            raise ValueError(f"loss={self.loss!r}; known: {sorted(_LOSSES)}")
        if self.loss == "l1+lpips" and self.lpips_weights is None:
            raise ValueError("loss=l1+lpips (the default) needs lpips_weights=<local LPIPS-VGG16 safetensors file> "
                             "(how to make one: jaxeff/dcae/perceptual.py); or choose loss=l1 / loss=l1+mse")
        if self.loss != "l1+lpips" and self.lpips_weights is not None:
            raise ValueError(f"lpips_weights is given but loss={self.loss!r} does not use it")
        for name in ("lpips_weights", "metric_lpips_weights"):
            if getattr(self, name) is not None and not Path(getattr(self, name)).exists():
                raise FileNotFoundError(f"{name}={getattr(self, name)} does not exist")
        for name in ("low_res", "high_res", "test_low", "test_high"):
            sizes = getattr(self, name)
            if any(s % 8 for s in (sizes if isinstance(sizes, tuple) else (sizes,))):
                raise ValueError(f"{name}={sizes} must be a multiple of the compression factor 8")
        if self.high_res <= self.low_res:
            raise ValueError("high_res must exceed low_res")


_LOSSES = {"l1+lpips": l1_lpips_loss, "l1": l1_loss, "l1+mse": l1_mse_loss}


def autoencoder_config(cfg: Config) -> DCAEConfig:
    """f8c16 DC-AE with ResBlock stages at high resolution and EfficientViT stages near the latent; the decoder's
    ResBlock stages use BatchNorm + ReLU (in/mix) or RMSNorm + SiLU (sana)."""
    if cfg.decoder_norm not in ("batch_norm", "rms_norm"):
        raise ValueError(f"decoder_norm={cfg.decoder_norm!r}: batch_norm | rms_norm")
    w = cfg.base_width
    act = "relu" if cfg.decoder_norm == "batch_norm" else "silu"
    return DCAEConfig(
        latent_channels=16,
        attention_head_dim=16,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(w, 2 * w, 4 * w, 4 * w),
        decoder_block_out_channels=(w, 2 * w, 4 * w, 4 * w),
        encoder_layers_per_block=(1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        encoder_qkv_multiscales=((),) * 4,
        decoder_qkv_multiscales=((),) * 4,
        decoder_norm_types=(cfg.decoder_norm,) * 2 + ("rms_norm",) * 2,
        decoder_act_fns=(act,) * 2 + ("silu",) * 2,
    )


PHASE_LAYERS = {
    1: ("encoder.", "decoder."),
    2: ("encoder.down_blocks.3.", "encoder.conv_out.", "decoder.conv_in.", "decoder.up_blocks.3."),
    3: ("decoder.up_blocks.0.", "decoder.norm_out.", "decoder.conv_out."),
}


def _dotted(path) -> str:
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    return ".".join(str(k) for k in keys if k is not None) + "."


def phase_labels(params, phase: int):
    """"train" for the phase's layers, "freeze" for the rest (the optax mask)."""
    prefixes = PHASE_LAYERS[phase]
    return jax.tree_util.tree_map_with_path(lambda p, _: "train" if _dotted(p).startswith(prefixes) else "freeze",
                                            params)


def masked(tx: optax.GradientTransformation, labels) -> optax.GradientTransformation:
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


class PatchDiscriminator(nnx.Module):
    """pix2pix-style PatchGAN (4x4 convs, strides 2-2-1-1, LeakyReLU 0.2; norms left out): a real/fake logit per
    overlapping patch."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        chans = (3, width, 2 * width, 4 * width)
        self.convs = nnx.List([nnx.Conv(a, b, (4, 4), strides=s, padding=1, rngs=rngs)
                               for a, b, s in zip(chans[:-1], chans[1:], (2, 2, 1))])
        self.out = nnx.Conv(4 * width, 1, (4, 4), padding=1, rngs=rngs)

    def __call__(self, x):
        for conv in self.convs:
            x = jax.nn.leaky_relu(conv(x), 0.2)
        return self.out(x)


def make_gan_step(graphdef, d_graphdef, g_tx, d_tx, cfg: Config, loss_fn, loss_args: tuple):
    """Jitted generator (masked to the decoder head, whose BatchNorm layers train) and discriminator updates on one
    batch: `step(g_params, stats, d_params, g_opt, d_opt, images) -> (..., metrics)`."""

    def step(g_params, stats, d_params, g_opt, d_opt, x, loss_args):
        def g_loss(gp):
            model = nnx.merge(graphdef, gp, stats, copy=True)
            set_norm_modes(model, PHASE_LAYERS[3])
            y = model(x)
            adv = -jnp.mean(nnx.merge(d_graphdef, d_params)(y))
            rec = loss_fn(y, x, *loss_args)
            return rec + cfg.gan_weight * adv, (y, rec, adv, nnx.state(model, nnx.BatchStat))

        (_, (y, rec, adv, stats)), grads = jax.value_and_grad(g_loss, has_aux=True)(g_params)
        updates, g_opt = g_tx.update(grads, g_opt, g_params)
        g_params = optax.apply_updates(g_params, updates)

        def d_loss(dp):
            disc = nnx.merge(d_graphdef, dp)
            return jnp.mean(jax.nn.relu(1 - disc(x))) + jnp.mean(jax.nn.relu(1 + disc(jax.lax.stop_gradient(y))))

        dl, dgrads = jax.value_and_grad(d_loss)(d_params)
        updates, d_opt = d_tx.update(dgrads, d_opt, d_params)
        return (g_params, stats, optax.apply_updates(d_params, updates), g_opt, d_opt,
                {"rec": rec, "g_adv": adv, "d": dl})

    jitted = jax.jit(step, donate_argnums=(0, 1, 2, 3, 4))
    return lambda *args: jitted(*args, loss_args)


@register("dcae_adaptation", Config, presets={
    "smoke": {"base_width": 16, "low_res": 32, "high_res": 128, "steps1": 300, "steps2": 100, "steps3": 100,
              "disc_width": 16, "test_high": (192, 288), "loss": "l1"},
    "full": {},
})
def run(cfg: Config, run: Run) -> None:
    """Three-phase decoupled high-resolution adaptation; PSNR/SSIM at low and high resolution after each phase."""
    loss_fn = _LOSSES[cfg.loss]
    mesh = run.data_mesh(math.gcd(cfg.batch_low, cfg.batch_high))  # one mesh that both phases' batches split over
    if cfg.loss == "l1+lpips":
        loss_args = (replicate(load_lpips_weights(cfg.lpips_weights, net="vgg"), mesh), cfg.lpips_weight)
        loss_note = f"loss L1 + {cfg.lpips_weight} x LPIPS-VGG16 ({cfg.lpips_weights})"
    else:
        loss_args = ()
        loss_note = f"loss {cfg.loss.upper()} (not the maintainers' L1 + perceptual: no LPIPS weights used)"
    metric_lpips = None if cfg.metric_lpips_weights is None else load_lpips_weights(cfg.metric_lpips_weights, "alex")
    run.print(loss_note)

    acfg = autoencoder_config(cfg)
    graphdef, params, _ = init_model(acfg, 0)
    images = [load_image(n) for n in TRAIN_IMAGES]
    tests = {res: np.stack([to_signed(resize_to(load_image(n), size)) for n in TEST_IMAGES])
             for res, size in (("low", cfg.test_low), ("high", cfg.test_high))}
    recon = make_recon(graphdef)
    phases = []  # (phase, resolution, batch, steps, masked optimizer, compiled step)
    for phase, res, batch, steps, lr in ((1, cfg.low_res, cfg.batch_low, cfg.steps1, cfg.lr1),
                                         (2, cfg.high_res, cfg.batch_high, cfg.steps2, cfg.lr2)):
        tx = masked(optax.adamw(optax.cosine_decay_schedule(lr, steps, 0.05)), phase_labels(params, phase))
        phases.append((phase, res, batch, steps, tx,
                       make_step(graphdef, tx, loss_fn, loss_args, train_norms=PHASE_LAYERS[phase])))
    d_graphdef = nnx.graphdef(PatchDiscriminator(cfg.disc_width, rngs=nnx.Rngs(jax.random.key(0, impl="rbg"))))
    g_tx = masked(optax.adam(cfg.lr3, b1=0.5, b2=0.9), phase_labels(params, 3))
    d_tx = optax.adam(cfg.lr3, b1=0.5, b2=0.9)
    gan_step = make_gan_step(graphdef, d_graphdef, g_tx, d_tx, cfg, loss_fn, loss_args)
    rows = []

    def report(params, stats, label: str, phase: int, seed: int):
        row = {"after": label, "seed": seed, "trainable params": _count(params, phase)}
        for res, test in tests.items():
            m = reconstruction_metrics(to_host(recon(params, stats, test)), test, metric_lpips)  # numpy in: replicated
            row.update({f"{k} {res}": v for k, v in m.items()})
        row["PSNR gap (low - high)"] = row["PSNR low"] - row["PSNR high"]
        rows.append(row)
        run.log(phase, **{k.replace(" ", "_"): v for k, v in row.items() if k != "after"})

    for seed in range(cfg.seeds):
        _, params, stats = init_model(acfg, seed)
        params, stats = replicate((params, stats), mesh)
        for phase, res, batch, steps, tx, step in phases:
            opt_state = replicate(tx.init(params), mesh)
            sampler = CropSampler(images, res, seed=100 * phase + seed)
            for i in run.progress(range(steps), desc=f"seed {seed} phase {phase} @ {res}px"):
                x = shard_global_batch(sampler.sample(batch), mesh)
                params, stats, opt_state, l = step(params, stats, opt_state, x)
                if i % 50 == 0 or i == steps - 1:
                    run.log(i, phase=phase, seed=seed, loss=float(l))
            report(params, stats, f"phase {phase} ({res}px, {'all layers' if phase == 1 else 'latent-side layers'})",
                   phase, seed)
        d_params = nnx.state(PatchDiscriminator(cfg.disc_width, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg"))))
        d_params, g_opt, d_opt = replicate((d_params, g_tx.init(params), d_tx.init(d_params)), mesh)
        sampler = CropSampler(images, cfg.low_res, seed=300 + seed)
        for i in run.progress(range(cfg.steps3), desc=f"seed {seed} phase 3 @ {cfg.low_res}px (GAN)"):
            batch = shard_global_batch(sampler.sample(cfg.batch_low), mesh)
            params, stats, d_params, g_opt, d_opt, m = gan_step(params, stats, d_params, g_opt, d_opt, batch)
            if i % 50 == 0 or i == cfg.steps3 - 1:
                run.log(i, phase=3, seed=seed, **{k: float(v) for k, v in m.items()})
        report(params, stats, f"phase 3 ({cfg.low_res}px, decoder head + GAN)", 3, seed)

    run.results(
        rows,
        title=f"Decoupled high-resolution adaptation: low {cfg.low_res}px / high {cfg.high_res}px training, "
              f"{cfg.seeds} seed(s)",
        note=(f"{loss_note}; decoder ResBlock stages {cfg.decoder_norm}. Test: whole {', '.join(TEST_IMAGES)} "
              f"resized to {cfg.test_low} (low) and {cfg.test_high} (high); PSNR / SSIM"
              f"{' / LPIPS-AlexNet' if metric_lpips else ''} as the official evaluator computes them. The two "
              "resolutions differ in content scale, so read the gap's change across phases, not its sign. Phase 2 "
              f"trains {', '.join(PHASE_LAYERS[2])}; phase 3 trains {', '.join(PHASE_LAYERS[3])}."),
    )


def _count(params, phase: int) -> int:
    labels = jax.tree.leaves(phase_labels(params, phase))
    return int(sum(x.size for x, lab in zip(jax.tree.leaves(params), labels) if lab == "train"))
