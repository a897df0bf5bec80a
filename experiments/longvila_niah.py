"""Synthetic video needle-in-a-haystack with MM-SP evaluation (LongVILA's V-NIAH at toy scale).

Trains the tiny video VLM (`jaxeff.longvila.vlm`) on short videos (train_frames_min..max frames, needle at a random
depth) on one device, then evaluates teacher-forced one-token answers over `eval_frames` x `depths` with the MM-SP
forward (stage-1 frame sharding, stage-2 zigzag re-shard, 2D attention) over a (ring x ulysses) mesh; the longest
frame count is at least 4x the training length. Writes an accuracy heatmap (`niah_heatmap.png`) and table.

Needs ring*ulysses devices: on a CPU-only host with fewer, the body re-runs itself in a child process with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (`jaxeff.longvila.devices`). Run on CPU only so far.

Multi-process: training is data parallel (`Run.data_mesh`: the devices of all processes that `batch` divides
among); the trained weights are then replicated on the 2D (ring x ulysses) mesh over all processes' devices
for the MM-SP evaluation (`ring * ulysses` = the global device count). Run on: 8 CPU devices in one process
(tests/multidevice/test_longvila_experiments.py); 2 processes x 4 CPU devices on one machine (by hand, tiny sizes:
training over 4 of the 8 devices, MM-SP evaluation on the 2 x 4 mesh across both processes, its loss equal to the
unsplit model's).

    make exp name=longvila_niah preset=smoke
"""

import dataclasses

import jax
import numpy as np
from flax import nnx

from jaxeff.distributed import replicate, shard_global_batch, to_host
from jaxeff.experiment import Run, register
from jaxeff.longvila.devices import run_on_devices
from jaxeff.longvila.measure import sp_mesh
from jaxeff.longvila.niah import NeedleTask
from jaxeff.longvila.vlm import MMSPConfig, VideoVLM, make_mmsp_loss, tiny_config, unsplit_loss, vlm_loss
from jaxeff.train import OptimConfig, init_train_state, make_optimizer, make_train_step, merge


@dataclasses.dataclass(frozen=True)
class Config:
    steps: int = 600
    batch: int = 32
    lr: float = 3e-3
    train_frames_min: int = 4
    train_frames_max: int = 8
    temporal_pool: int = 2
    noise_scale: float = 0.5
    hidden: int = 64
    layers: int = 2
    rope_theta: float = 1e6  # LongVILA extends the context by raising RoPE theta
    eval_frames: tuple[int, ...] = (8, 16, 32, 64)
    depths: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    eval_videos: int = 16
    ring: int = 2
    ulysses: int = 4
    log_every: int = 25
    seed: int = 0

    def validate(self):
        if not 1 <= self.train_frames_min <= self.train_frames_max:
            raise ValueError("need 1 <= train_frames_min <= train_frames_max")
        if max(self.eval_frames) < 4 * self.train_frames_max:
            raise ValueError(f"the longest eval video ({max(self.eval_frames)} frames) must be at least 4x the "
                             f"training length ({self.train_frames_max})")
        if any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError("depths must lie in [0, 1]")
        if self.steps < 1 or self.batch < 1 or self.eval_videos < 1:
            raise ValueError("steps, batch and eval_videos must be >= 1")


@register("longvila_niah", Config, presets={
    "smoke": {},
    "full": {"steps": 5000, "batch": 64, "train_frames_min": 16, "train_frames_max": 32, "temporal_pool": 4,
             "hidden": 256, "layers": 4, "eval_frames": (32, 64, 128, 256, 512, 1024), "eval_videos": 64},
})
def run(cfg: Config, run: Run) -> None:
    """Video needle-in-a-haystack: train on short videos, evaluate long ones with MM-SP."""
    run_on_devices(body, cfg, run, cfg.ring * cfg.ulysses)


def body(cfg: Config, run: Run) -> None:
    task = NeedleTask(noise_scale=cfg.noise_scale)
    vcfg = tiny_config(vocab_size=task.vocab_size, image_size=task.image_size, temporal_pool=cfg.temporal_pool,
                       hidden=cfg.hidden, layers=cfg.layers, rope_theta=cfg.rope_theta)
    model = VideoVLM(vcfg, rngs=nnx.Rngs(cfg.seed))
    tx = make_optimizer(OptimConfig(lr=cfg.lr, warmup_steps=min(50, cfg.steps // 10), total_steps=cfg.steps))
    data_mesh = run.data_mesh(cfg.batch)
    graphdef, state = init_train_state(model, tx, mesh=data_mesh)
    step_fn = make_train_step(graphdef, vlm_loss, tx)
    rng = np.random.default_rng(cfg.seed)
    for step in run.progress(range(cfg.steps), desc="train"):
        nf = rng.integers(cfg.train_frames_min, cfg.train_frames_max + 1, cfg.batch)
        state, metrics = step_fn(state, shard_global_batch(task.batch(rng, cfg.batch, nf), data_mesh))
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            m = to_host(metrics)
            run.log(step, loss=float(m["loss"]), acc=float(m["correct"] / m["count"]))

    mesh = sp_mesh(cfg.ring, cfg.ulysses)
    model_graph, model_state = nnx.split(merge(graphdef, state))
    model_state = replicate(model_state, mesh)  # from the data-parallel mesh onto the 2D one
    eval_fn = jax.jit(make_mmsp_loss(model_graph, mesh, MMSPConfig()))
    eval_rng = np.random.default_rng(cfg.seed + 1)
    acc = np.zeros((len(cfg.depths), len(cfg.eval_frames)))
    for j, frames in enumerate(run.progress(cfg.eval_frames, desc="eval")):
        for i, depth in enumerate(cfg.depths):
            _, stats = to_host(eval_fn(model_state, task.batch(eval_rng, cfg.eval_videos, frames, depth)))
            acc[i, j] = float(stats["correct"] / stats["count"])
            run.log(cfg.steps, frames=frames, depth=depth, acc=acc[i, j], loss=float(stats["loss"]))
    # The MM-SP evaluation is the unsplit model: check it on the longest videos.
    check = task.batch(eval_rng, 2, max(cfg.eval_frames))
    sp_loss = float(to_host(eval_fn(model_state, check)[0]))
    ref_loss = float(to_host(jax.jit(lambda s: unsplit_loss(nnx.merge(model_graph, s), check)[0])(model_state)))

    rows = [{"depth": d, **{f"{f} frames": acc[i, j] for j, f in enumerate(cfg.eval_frames)}, "mean": acc[i].mean()}
            for i, d in enumerate(cfg.depths)]
    rows.append({"depth": "mean", **{f"{f} frames": acc[:, j].mean() for j, f in enumerate(cfg.eval_frames)},
                 "mean": acc.mean()})
    tokens = {f: vcfg.visual_tokens(f) + 1 for f in cfg.eval_frames}
    run.results(rows, title="Needle accuracy (MM-SP eval, fraction correct)",
                note=f"Trained on {cfg.train_frames_min}-{cfg.train_frames_max} frames ({cfg.steps} steps); "
                     f"evaluated with MM-SP over ring={cfg.ring} x ulysses={cfg.ulysses} devices, {cfg.eval_videos} "
                     f"videos per cell; sequence tokens per frame count: {tokens}; temporal pool "
                     f"{cfg.temporal_pool}; chance = {1 / task.num_needles:.2f}. MM-SP vs single-device loss on "
                     f"{max(cfg.eval_frames)}-frame videos: {sp_loss:.6g} vs {ref_loss:.6g} "
                     f"(rel diff {abs(sp_loss / ref_loss - 1):.2e}).")
    run.save_json("niah_accuracy.json", {"frames": cfg.eval_frames, "depths": cfg.depths, "accuracy": acc})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(cfg.eval_frames) + 2, 0.5 * len(cfg.depths) + 2))
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cfg.eval_frames)), [str(f) for f in cfg.eval_frames])
    ax.set_yticks(range(len(cfg.depths)), [f"{d:.0%}" for d in cfg.depths])
    for i in range(len(cfg.depths)):
        for j in range(len(cfg.eval_frames)):
            ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.axvline(np.searchsorted(cfg.eval_frames, cfg.train_frames_max, side="right") - 0.5, color="k", ls="--")
    ax.set_xlabel("frames (dashed: training length)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"V-NIAH accuracy, MM-SP {cfg.ring}x{cfg.ulysses}")
    fig.colorbar(im, ax=ax)
    run.savefig(fig, "niah_heatmap.png")
