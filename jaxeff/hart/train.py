"""Training losses for the HART parts (used by the `hart_tiny` experiment; CPU-tested only).

- `tokenizer_loss`: VQ-VAE reconstruction (MSE) + multi-scale VQ loss; `skip_prob` is the probability of dropping
  the continuous residual (1.0 = discrete-only VAR training, 0.5 = HART's hybrid decoder fine-tuning, where only
  the decoder is trainable). No perceptual / GAN losses (the released tokenizer used them).
- `hart_loss`: cross-entropy over all scales (dropped last-scale tokens excluded) + residual diffusion loss. As in
  the reference training forward, the diffusion target is the true residual minus the code vectors of tokens
  *sampled from the model's own logits* (top-k, top-p 0.96), repeated `diffusion_batch_mul` times. The weighting of
  the two losses is not in the public code (hart issue #15); they are summed here. Condition dropout follows the
  reference's rule by default (`drop_condition`); the fraction dropped is reported as the `cond_drop` metric.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxeff.data import psnr as image_psnr
from jaxeff.hart import diffusion as diff
from jaxeff.hart.transformer import HARTTransformer, filter_logits, sample_keep_mask


def tokenizer_loss(tok, batch, skip_prob: float):
    img, key = batch["img"], batch["key"]
    skip = jax.random.uniform(key) < skip_prob
    rec, vq = tok(img, skip)
    mse = jnp.mean((rec - img) ** 2)
    return mse + vq, {"mse": mse, "vq": vq}


class ClassConditionedHART(nnx.Module):
    """A HART transformer whose "text" is a learned table of `context_token` vectors per class label."""

    def __init__(self, transformer: HARTTransformer, num_classes: int, *, rngs: nnx.Rngs):
        cfg = transformer.cfg
        self.transformer = transformer
        self.table = nnx.Param(jax.random.normal(rngs.params(), (num_classes, cfg.context_token, cfg.context_dim)))

    def context(self, labels):
        t = self.transformer.cfg.context_token
        return self.table[...][labels], jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (labels.shape[0], t))


def drop_condition(key, batch: int, rate: float, rule: str = "official"):
    """[batch] bool, True where a sample's text condition is zeroed in training (positions are kept).

    rule "official": `randn(B) < rate`, the reference training forward's draw (hart_transformer_t2i.py:606-609), which
    drops Phi(rate) of the samples (about 54% at rate 0.1; probably a typo for `rand`, and whether the released
    weights were trained this way is unknown); "uniform": `rand(B) < rate`, the intended `rate` share."""
    if rule == "official":
        return jax.random.normal(key, (batch,)) < rate
    if rule == "uniform":
        return jax.random.uniform(key, (batch,)) < rate
    raise ValueError(f"condition-dropout rule must be 'official' or 'uniform', got {rule!r}")


def hart_loss(model: ClassConditionedHART, batch, top_k: int = 600, top_p: float = 0.96, diff_target: str = "sampled",
              cond_drop: str = "official"):
    """batch: idx [B, L] (all scales), teacher [B, L-1, Cvae], resid [B, n_last, Cvae] (residual before the last
    discrete scale), labels [B], codebook [V, Cvae], key. `diff_target`: "sampled" (the reference: residual w.r.t.
    codes sampled from the model's logits) or "gt" (w.r.t. the ground-truth codes). `cond_drop`: the
    `drop_condition` rule applied with the config's `cond_drop_rate`."""
    if diff_target not in ("sampled", "gt"):
        raise ValueError(f"diff_target must be 'sampled' or 'gt', got {diff_target!r}")
    tr = model.transformer
    cfg = tr.cfg
    k_drop, k_keep, k_samp, k_diff = jax.random.split(batch["key"], 4)
    ctx, pos = model.context(batch["labels"])
    drop = drop_condition(k_drop, ctx.shape[0], cfg.cond_drop_rate, cond_drop)
    ctx = jnp.where(drop[:, None, None], 0.0, ctx)
    n_last = cfg.patch_nums[-1] ** 2
    keep = sample_keep_mask(k_keep, ctx.shape[0], n_last, cfg.mar_min_keep)
    logits, h_last = tr.forward_train(ctx, pos, batch["teacher"], keep)
    ce_tok = optax.softmax_cross_entropy_with_integer_labels(logits, batch["idx"])
    w = jnp.concatenate([jnp.ones((ctx.shape[0], logits.shape[1] - n_last)), keep.astype(jnp.float32)], 1)
    ce = jnp.sum(ce_tok * w) / jnp.sum(w)
    lg_last = filter_logits(jax.lax.stop_gradient(logits[:, -n_last:]), top_k, top_p)
    idx_last = batch["idx"][:, -n_last:] if diff_target == "gt" else jax.random.categorical(k_samp, lg_last, axis=-1)
    codes = batch["codebook"][idx_last]
    target = batch["resid"] - codes
    z = tr.diffusion_condition(h_last, codes)
    m = cfg.diffusion_batch_mul
    dl = diff.loss(tr.diffloss, _TRAIN_SCHED, jnp.tile(target.reshape(-1, cfg.cvae), (m, 1)),
                   jnp.tile(z.reshape(-1, cfg.embed_dim), (m, 1)), k_diff, jnp.tile(keep.reshape(-1), m),
                   scale=cfg.vae_scale)
    acc = jnp.sum((jnp.argmax(logits, -1) == batch["idx"]) * w) / jnp.sum(w)
    return ce + dl, {"ce": ce, "diff": dl, "acc": acc, "cond_drop": jnp.mean(drop.astype(jnp.float32))}


_TRAIN_SCHED = diff.Schedule.make(1000)


def psnr(a, b) -> float:
    """PSNR in dB of a batch of images in [-1, 1] with the MSE pooled over the whole batch (`jaxeff.data.psnr` of
    the batch as one image)."""
    return float(image_psnr(jnp.asarray(a)[None], jnp.asarray(b)[None])[0])
