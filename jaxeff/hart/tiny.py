"""The whole HART pipeline trained from scratch on scikit-learn's 8x8 digits (upsampled), class-conditioned, at
toy size on CPU: (1) VQ tokenizer, discrete-only; (2) hybrid decoder fine-tuning (encoder/codebook frozen, residual
dropped with p=0.5); (3) AR transformer + residual diffusion head. `run_tiny` reports reconstruction PSNR
discrete-only vs hybrid with the true residual vs hybrid with a residual sampled by the diffusion head, and saves
reconstruction and generated-sample grids into the run directory.

Used by the `hart_tiny` experiment and by `hart_1024` when it runs without the released weights; `TINY_PRESETS`
are the `smoke` / `full` sizes both use.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.experiment import Run, image_grid
from jaxeff.hart import diffusion as diff
from jaxeff.hart.pipeline import HART
from jaxeff.hart.tokenizer import HARTTokenizer, TokenizerConfig
from jaxeff.hart.train import ClassConditionedHART, hart_loss, psnr, tokenizer_loss
from jaxeff.hart.transformer import HARTConfig, HARTTransformer, SampleOptions
from jaxeff.train.step import OptimConfig, init_train_state, make_optimizer, make_train_step, merge

SCALES = {16: (1, 2, 3, 4), 32: (1, 2, 3, 4, 6, 8)}


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    """Sizes and training lengths of the tiny pipeline (`image_size` 16 or 32: the scales of `SCALES`)."""

    image_size: int = 16
    tok_ch: int = 32
    vocab: int = 128
    cvae: int = 8
    embed_dim: int = 96
    depth: int = 3
    heads: int = 4
    diff_width: int = 96
    diff_depth: int = 2
    tok_steps: int = 200
    hybrid_steps: int = 100
    ar_steps: int = 300
    batch: int = 32
    lr_tok: float = 2e-3
    lr_ar: float = 1e-3
    cfg: float = 1.5
    top_k: int = 0
    more_smooth: bool = False
    diff_target: Literal["sampled", "gt"] = "gt"
    cond_drop: Literal["official", "uniform"] = "official"  # `jaxeff.hart.train.drop_condition` rule
    per_class: int = 4
    num_eval: int = 200
    seed: int = 0

    def validate(self):
        if self.image_size not in SCALES:
            raise ValueError(f"image_size must be one of {sorted(SCALES)}")
        for k in ("tok_steps", "hybrid_steps", "ar_steps", "batch", "per_class", "num_eval"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1")


def digits(image_size: int):
    """sklearn's bundled 8x8 digits -> [N, S, S, 3] in [-1, 1] (bilinear upsampling), labels [N]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = jnp.asarray(d.images / 16.0, jnp.float32)[..., None]
    x = jax.image.resize(x, (x.shape[0], image_size, image_size, 1), "linear")
    return np.asarray(jnp.tile(x * 2 - 1, (1, 1, 1, 3))), d.target.astype(np.int32)


def _loop(run: Run, desc, step_fn, state, batches, steps, log_every=25):
    metrics = {}
    for i in run.progress(range(steps), desc=desc):
        state, metrics = step_fn(state, batches(i))
        if i % log_every == 0 or i == steps - 1:
            run.log(i, phase=desc, **{k: float(v) for k, v in metrics.items()})
    return state, {k: float(v) for k, v in metrics.items()}


def run_tiny(cfg: TinyConfig, run: Run, label: str = "hart_tiny") -> dict:
    """Train the three stages, write the PSNR and training tables to `run`'s results.md and the grids
    `<label>_reconstructions.png` / `<label>_samples.png`. Returns {"psnr": {decoder input: dB}, "samples":
    float32 [10 * per_class, S, S, 3] generated images in about [0, 1]}."""
    t0 = time.time()
    x, y = digits(cfg.image_size)
    x_tr, y_tr, x_ev, y_ev = x[: -cfg.num_eval], y[: -cfg.num_eval], x[-cfg.num_eval:], y[-cfg.num_eval:]
    n = len(x_tr)
    rng = np.random.default_rng(cfg.seed)
    order = lambda i: rng.integers(0, n, cfg.batch)  # noqa: E731
    pns = SCALES[cfg.image_size]
    tcfg = TokenizerConfig(vocab_size=cfg.vocab, z_channels=cfg.cvae, ch=cfg.tok_ch, ch_mult=(1, 2, 2),
                           num_res_blocks=1, norm_groups=8, patch_nums=pns)
    tok = HARTTokenizer(tcfg, rngs=nnx.Rngs(cfg.seed))

    # (1) discrete-only VQ tokenizer; (2) hybrid decoder fine-tuning
    for phase, steps, skip, trainable in (
        ("tokenizer", cfg.tok_steps, 1.0, nnx.Param),
        ("hybrid_decoder", cfg.hybrid_steps, 0.5,
         nnx.All(nnx.Param, nnx.Any(nnx.PathContains("decoder"), nnx.PathContains("post_quant_conv")))),
    ):
        tx = make_optimizer(OptimConfig(lr=cfg.lr_tok, warmup_steps=min(20, steps), total_steps=steps))
        gd, st = init_train_state(tok, tx, trainable)
        step = make_train_step(gd, lambda m, b, s=skip: tokenizer_loss(m, b, s), tx)
        st, last = _loop(run, phase, step, st,
                         lambda i: {"img": jnp.asarray(x_tr[order(i)]), "key": jax.random.key(cfg.seed * 7919 + i)},
                         steps)
        tok = merge(gd, st)

    # tokens of the whole training set, once (the tokenizer is frozen from here on)
    @jax.jit
    def tokens(gs, img):
        t = nnx.merge(*gs)
        idx, resid, _ = t.quantize.encode_hybrid(t.encode(img))
        return jnp.concatenate(idx, 1), t.quantize.teacher_forcing_input(idx), resid.reshape(img.shape[0], -1, cfg.cvae)

    gs = nnx.split(tok)
    idx_all, teach_all, resid_all = (np.concatenate(a) for a in zip(*[tokens(gs, jnp.asarray(x_tr[i:i + 256]))
                                                                      for i in range(0, n, 256)]))

    # (3) transformer + residual diffusion. The residual scale plays the role of HART's vae_scale=0.6 for this
    # tokenizer's latents: 3 std of the final residual, so the clipped x0 range [-1, 1] covers it.
    final_resid = resid_all - np.asarray(tok.quantize.codebook)[idx_all[:, -pns[-1] ** 2:]]
    vae_scale = round(3 * float(np.std(final_resid)), 3)
    hcfg = HARTConfig(vae_scale=vae_scale, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.heads,
                      context_token=2, context_dim=32, vocab_size=cfg.vocab, cvae=cfg.cvae, patch_nums=pns,
                      diff_width=cfg.diff_width, diff_depth=cfg.diff_depth, mar_min_keep=4, diffusion_batch_mul=2)
    model = ClassConditionedHART(HARTTransformer(hcfg, rngs=nnx.Rngs(cfg.seed + 1)), 10, rngs=nnx.Rngs(cfg.seed + 2))
    tx = make_optimizer(OptimConfig(lr=cfg.lr_ar, warmup_steps=min(40, cfg.ar_steps), total_steps=cfg.ar_steps,
                                    weight_decay=0.01))
    gd, st = init_train_state(model, tx)
    codebook = tok.quantize.codebook
    top_k = cfg.top_k or cfg.vocab
    loss = lambda m, b: hart_loss(m, b, top_k=top_k, diff_target=cfg.diff_target, cond_drop=cfg.cond_drop)  # noqa: E731
    step = make_train_step(gd, loss, tx)

    def batch(i):
        j = order(i)
        return {"idx": jnp.asarray(idx_all[j]), "teacher": jnp.asarray(teach_all[j]),
                "resid": jnp.asarray(resid_all[j]), "labels": jnp.asarray(y_tr[j]), "codebook": codebook,
                "key": jax.random.key(10**6 + i)}

    st, ar_last = _loop(run, "transformer", step, st, batch, cfg.ar_steps)
    model = merge(gd, st)
    tr = model.transformer

    # reconstruction PSNR on held-out digits: discrete-only / hybrid with the true residual / hybrid with the
    # residual sampled by the trained diffusion head (teacher-forced on the image's own tokens)
    @jax.jit
    def recon(gs_tok, gs_model, img, labels, key):
        t, m = nnx.merge(*gs_tok), nnx.merge(*gs_model)
        f = t.encode(img)
        idx, resid, f_hat = t.quantize.encode_hybrid(f)
        ctx, pos = m.context(labels)
        _, h_last = m.transformer.forward_train(ctx, pos, t.quantize.teacher_forcing_input(idx))
        last = t.quantize.lookup(idx[-1], pns[-1]).reshape(img.shape[0], -1, cfg.cvae)
        z = m.transformer.diffusion_condition(h_last, last)
        sched = diff.Schedule.make(1000, hcfg.num_sampling_steps)
        res, res_t0 = (diff.sample(m.transformer.diffloss, sched, z.reshape(-1, cfg.embed_dim), key,
                                   scale=vae_scale, temperature=temp).reshape(f.shape) for temp in (1.0, 0.0))
        return (t.decode(t.quantize.idx_to_fhat(idx, last_phi=True)), t.decode(f), t.decode(f_hat + res),
                t.decode(f_hat), t.decode(f_hat + res_t0))

    outs = recon(nnx.split(tok), nnx.split(model), jnp.asarray(x_ev), jnp.asarray(y_ev), jax.random.key(cfg.seed))
    names = ("discrete-only", "hybrid (true residual)", "hybrid (sampled residual)")
    rows = [{"decoder input": nm, "PSNR dB": psnr(o, x_ev)} for nm, o in zip(names, outs[:3])]
    rows.append({"decoder input": "hybrid (sampled residual, temperature 0)", "PSNR dB": psnr(outs[4], x_ev)})
    rows.append({"decoder input": "discrete, no residual (generation path)", "PSNR dB": psnr(outs[3], x_ev)})
    run.results(rows, title=f"{label}: reconstruction PSNR on {len(x_ev)} held-out digits ({cfg.image_size}px)",
                note=("Tokenizer, decoder and diffusion head all trained here from scratch (MSE + VQ losses only). "
                      f"Diffusion target w.r.t. {cfg.diff_target} codes; residual scale {vae_scale}. A sampled "
                      "residual is a draw from the head's distribution, not the image's own residual."))
    fig = image_grid(np.clip(np.concatenate([(x_ev[:8] + 1) / 2] + [(np.asarray(o[:8]) + 1) / 2 for o in outs[:3]]),
                             0, 1), 4, 8)
    run.savefig(fig, f"{label}_reconstructions.png")

    # class-conditional generation with the trained tiny model (HART sampling: CFG ramp, top-k, 8-step diffusion)
    hart = HART(tr, tok)
    labels = np.repeat(np.arange(10), cfg.per_class)
    ctx, pos = model.context(jnp.asarray(labels))
    opts = SampleOptions(cfg=cfg.cfg, top_k=top_k, top_k_late=top_k, more_smooth=cfg.more_smooth)
    t1 = time.time()
    imgs = np.asarray(hart.generate(context=ctx, ctx_pos=pos, seed=cfg.seed, opts=opts))
    gen_s = time.time() - t1
    run.savefig(image_grid(np.clip(imgs, 0, 1), 10, cfg.per_class), f"{label}_samples.png")
    final = {k: round(v, 4) for k, v in ar_last.items()}
    run.results([{"phase": "tokenizer (VQ)", "steps": cfg.tok_steps},
                 {"phase": "hybrid decoder", "steps": cfg.hybrid_steps},
                 {"phase": "transformer + diffusion", "steps": cfg.ar_steps, "condition dropout": cfg.cond_drop,
                  **final}],
                title=f"{label}: training", note=(
                    f"Generated {len(labels)} images (10 classes x {cfg.per_class}, cfg {cfg.cfg}) in {gen_s:.1f}s "
                    f"incl. compilation -> `{label}_samples.png`; total wall time {time.time() - t0:.0f}s (CPU)."))
    return {"psnr": {r["decoder input"]: r["PSNR dB"] for r in rows}, "samples": imgs}


# `smoke` is the default config; `full` is 32px with a wider model and longer training
TINY_PRESETS = {
    "smoke": {},
    "full": {"image_size": 32, "tok_ch": 64, "vocab": 512, "cvae": 16, "embed_dim": 256, "depth": 6, "heads": 4,
             "diff_width": 256, "diff_depth": 3, "tok_steps": 3000, "hybrid_steps": 1500, "ar_steps": 6000},
}
