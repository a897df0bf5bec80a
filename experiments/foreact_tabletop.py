"""foreact_tabletop: ForeAct's mechanism at toy scale: does a policy given an imagined subtask-end frame (foresight)
beat one given only text?

World (`jaxeff.foreact.tabletop`): a rendered 32x32 tabletop with a gripper, three coloured blocks and three pads;
12 multi-step tasks (sort onto pads / stack, in every order), 3 subtasks each; a scripted expert.
Planner: `ScriptedPlanner`, an oracle subtask decomposer and monitor reading the simulator. **No VLM is involved.**

Generator: ForeAct's own image-edit SANA transformer (`jaxeff.foreact.SanaEditTransformer`, tiny config) trained
here with the official recipe (rectified flow, uniform t, official CFG dropout to the empty caption / a black
source) to predict the subtask-end frame from a frame of that subtask and the subtask text. "Latents" are the pixels
themselves, space-to-depth by 4 (32x32x3 -> 8x8x48, lossless): DC-AE is too slow to train or run here on a 2-core
CPU, and a 32x32 frame needs no compression. Caption features: frozen random word embeddings (standing in for the
frozen Gemma-2), always starting with a start token (the official prompts keep their system prompt when the caption
is empty). Sampling: the official Flow-DPM-Solver++ (8 steps) with 3-way CFG; the null source is the official
mid-grey (`null_frame=grey`) or the black image training dropped to (`null_frame=black`).
The generator is trained on its own pool of expert episodes (`gen_episodes`), separate from the policy demos.

Policy: a small CNN behaviour-cloned on expert demos, in four conditions (as in the released pi0.5 scripts, the
goal-conditioned policies are trained with ground-truth goals):
- task: the task text (instruction) only (pi0 "flat" baseline; the planner still says when the task is done);
- subtask: the current subtask text;
- subtask+gen: subtask + generated foresight as an extra image (channel-concatenated);
- subtask+true: subtask + the true subtask-end frame (the expert run forward on a copy of the simulator).
The BC data is augmented with all 6 colour permutations (label-preserving; `augment=false` turns it off), and the
policy demos inject random moves with probability `expert_noise` (labels stay the expert's) so they show recovery.
Metrics: success over seeded evaluation episodes (the same layouts for every condition) with Wilson 95% intervals,
vs the number of demos; foresight PSNR to the true end frame (next to copying the current frame); milliseconds per
foresight (one frame, 8 steps x 3 CFG branches, after compilation).

`make exp name=foreact_tabletop` (smoke: minutes on a 2-core CPU) or `preset=full`.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxeff.experiment import Run, best_time, register
from jaxeff.foreact import tabletop as T
from jaxeff.foreact.config import SanaConfig
from jaxeff.foreact.generator import ForesightGenerator
from jaxeff.foreact.planner import Agent, GeneratorForesight, ScriptedPlanner
from jaxeff.foreact.training import apply_cfg_dropout, flow_matching_loss, training_draws
from jaxeff.train import OptimConfig, init_train_state, make_optimizer, make_train_step, merge

CONDITIONS = ("task", "subtask", "subtask+gen", "subtask+true")
PATCH = 4  # space-to-depth factor of the pixel "latents"
TEXT_DIM = 32


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    demos: int = 100
    demo_fractions: tuple[float, ...] = (0.2, 0.6, 1.0)
    gen_episodes: int = 400
    gen_steps: int = 4000
    gen_batch: int = 64
    gen_lr: float = 1e-3
    gen_dim: int = 128
    gen_layers: int = 4
    policy_steps: int = 1500
    policy_batch: int = 64
    policy_lr: float = 1e-3
    expert_noise: float = 0.2  # DART-style: random moves executed during the policy demos, expert labels kept
    augment: bool = True  # BC data under all 6 colour permutations (without it the policies memorised the demos)
    eval_episodes: int = 200
    max_steps_per_subtask: int = 40
    sample_steps: int = 8
    guidance_scale: float = 4.5
    image_guidance_scale: float = 1.5
    null_frame: str = "grey"
    psnr_cases: int = 128

    def validate(self):
        if not self.demo_fractions or not all(0 < f <= 1 for f in self.demo_fractions):
            raise ValueError(f"demo_fractions must lie in (0, 1], got {self.demo_fractions}")
        if self.null_frame not in ("grey", "black"):
            raise ValueError(f"null_frame must be grey or black, got {self.null_frame!r}")
        if min(self.demos, self.gen_episodes, self.gen_steps, self.policy_steps, self.eval_episodes) < 1:
            raise ValueError("demos, gen_episodes, gen_steps, policy_steps and eval_episodes must be >= 1")
        if self.gen_dim % 32:
            raise ValueError(f"gen_dim must be a multiple of 32 (head size), got {self.gen_dim}")


# ---------------------------------------------------------------------------------------------------------------
# data


def expert_episodes(n: int, seed: int, noise: float = 0.0) -> list[dict]:
    """n expert episodes: per subtask, frames before each action, the expert's actions and the end frame; `noise`:
    probability of executing a random move instead (the label stays the expert's)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        task = int(rng.integers(len(T.TASKS)))
        env = T.Tabletop().reset(rng, task)
        parts = []
        for sub in T.subtasks(task):
            frames, actions = T.rollout_subtask(env, sub, 128, noise=noise, rng=rng)
            parts.append({"subtask": sub, "frames": frames, "actions": actions, "end": env.render()})
        out.append({"task": task, "parts": parts})
    return out


def bc_arrays(episodes: list[dict]) -> dict[str, np.ndarray]:
    obs, goal, act, task, sub = [], [], [], [], []
    for ep in episodes:
        for part in ep["parts"]:
            for frame, a in zip(part["frames"], part["actions"]):
                obs.append(frame), goal.append(part["end"]), act.append(a)
                task.append(ep["task"]), sub.append(T.SUBTASKS.index(part["subtask"]))
    f32 = lambda x: np.asarray(x, np.float32)
    return {"obs": f32(obs), "goal": f32(goal), "action": np.asarray(act, np.int32),
            "task": np.asarray(task, np.int32), "subtask": np.asarray(sub, np.int32)}


def permute_colours(data: dict[str, np.ndarray], perm: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """The BC arrays with block / pad colour i renamed perm[i] in the frames, goals, subtasks and tasks (a
    label-preserving augmentation: the expert's actions do not depend on which colour is which)."""
    def recolour(frames):
        out = frames.copy()
        for table in (T._BLOCK_RGB, T._PAD_RGB):
            rgb = table / 127.5 - 1.0
            masks = [np.all(np.abs(frames - rgb[i]) < 1e-4, axis=-1) for i in range(3)]
            for i, m in enumerate(masks):
                out[m] = rgb[perm[i]]
        return out

    def rename(text):
        words = text.split()
        return " ".join(T.COLOURS[perm[T.COLOURS.index(w)]] if w in T.COLOURS else w for w in words)

    sub_map = np.array([T.SUBTASKS.index(rename(s)) for s in T.SUBTASKS], np.int32)
    task_map = np.array([T.TASKS.index((kind, tuple(perm[i] for i in order))) for kind, order in T.TASKS], np.int32)
    return {"obs": recolour(data["obs"]), "goal": recolour(data["goal"]), "action": data["action"],
            "task": task_map[data["task"]], "subtask": sub_map[data["subtask"]]}


def augmented(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`data` under all 6 colour permutations, concatenated."""
    parts = [permute_colours(data, perm) for perm in T.ORDERS]
    return {k: np.concatenate([p[k] for p in parts]) for k in data}


def to_latent(frames):
    """[B, 32, 32, 3] -> [B, 8, 8, 48] (space-to-depth; lossless)."""
    b, h, w, c = frames.shape
    x = frames.reshape(b, h // PATCH, PATCH, w // PATCH, PATCH, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // PATCH, w // PATCH, PATCH * PATCH * c)


def from_latent(lat):
    b, h, w, _ = lat.shape
    x = lat.reshape(b, h, w, PATCH, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
    return jnp.clip(x.reshape(b, h * PATCH, w * PATCH, 3), -1.0, 1.0)


class ToyText:
    """Frozen random word embeddings standing in for the frozen text encoder."""

    def __init__(self, seed: int):
        self.table = jnp.asarray(np.random.default_rng(seed).standard_normal((len(T.WORDS), TEXT_DIM)), jnp.float32)

    def __call__(self, texts):
        ids, mask = T.encode_words(list(texts))
        return self.table[jnp.asarray(ids)], jnp.asarray(mask)


# ---------------------------------------------------------------------------------------------------------------
# generator


def gen_config(cfg: Config) -> SanaConfig:
    heads = cfg.gen_dim // 32
    return SanaConfig(in_channels=PATCH * PATCH * 3, out_channels=PATCH * PATCH * 3, num_layers=cfg.gen_layers,
                      num_attention_heads=heads, attention_head_dim=32, num_cross_attention_heads=heads,
                      cross_attention_head_dim=32, cross_attention_dim=cfg.gen_dim, caption_channels=TEXT_DIM)


def train_generator(cfg: Config, run: Run, text: ToyText) -> ForesightGenerator:
    episodes = expert_episodes(cfg.gen_episodes, cfg.seed + 1)
    src, tgt, caps = [], [], []
    for ep in episodes:
        for part in ep["parts"]:
            for frame in part["frames"]:
                src.append(frame), tgt.append(part["end"]), caps.append(part["subtask"])
    src, tgt = to_latent(np.asarray(src, np.float32)), to_latent(np.asarray(tgt, np.float32))
    cap_ids = np.asarray([T.SUBTASKS.index(c) for c in caps], np.int32)
    sub_feats, sub_mask = text(list(T.SUBTASKS))
    null_feats, null_mask = text([""])
    black = to_latent(-np.ones((1, T.SIZE, T.SIZE, 3), np.float32))
    run.print(f"generator data: {len(src)} (frame, subtask-end frame) pairs from {cfg.gen_episodes} episodes")

    model = ForesightGenerator(gen_config(cfg), rngs=nnx.Rngs(cfg.seed))
    tx = make_optimizer(OptimConfig(lr=cfg.gen_lr, warmup_steps=min(200, cfg.gen_steps // 10),
                                    total_steps=cfg.gen_steps, schedule="cosine", weight_decay=0.0, grad_clip=0.5))
    graphdef, state = init_train_state(model, tx)

    def loss_fn(m, batch):
        k_drop, k_draw = jax.random.split(batch["key"])
        cap, mask, srcs = apply_cfg_dropout(k_drop, sub_feats[batch["cap"]], sub_mask[batch["cap"]], null_feats,
                                            null_mask, [batch["src"]], [black])
        u, noise = training_draws(k_draw, batch["tgt"].shape[0], [batch["tgt"].shape])
        return flow_matching_loss(m, [batch["tgt"]], srcs, cap, mask, u, noise), {}

    step_fn = make_train_step(graphdef, loss_fn, tx)
    rng = np.random.default_rng(cfg.seed + 2)
    key = jax.random.key(cfg.seed + 3)
    for step in run.progress(range(1, cfg.gen_steps + 1), desc="generator"):
        idx = rng.integers(len(src), size=cfg.gen_batch)
        state, metrics = step_fn(state, {"src": src[idx], "tgt": tgt[idx], "cap": cap_ids[idx],
                                         "key": jax.random.fold_in(key, step)})
        if step % max(cfg.gen_steps // 20, 1) == 0 or step == cfg.gen_steps:
            run.log(step, phase="generator", loss=float(metrics["loss"]))
    return merge(graphdef, state)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of frames in [-1, 1], on the [0, 1] scale."""
    mse = np.mean(np.square((np.asarray(a) - np.asarray(b)) / 2.0), axis=(1, 2, 3))
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-10))


# ---------------------------------------------------------------------------------------------------------------
# policy


class Policy(nnx.Module):
    """Keypoint policy: convolutions over the 8x8 cell grid (observation + goal image, space-to-depth, plus cell
    coordinates), the condition (task or subtask id) entering by FiLM, then a spatial soft-argmax per map (expected
    row / column and peak logit of each of `keypoints` maps) and an MLP to the action logits. A plain CNN with a
    flattening layer memorised the demos (92% train, ~25% held-out action accuracy on 40 demos)."""

    def __init__(self, n_cond: int, goal: bool, *, rngs: nnx.Rngs, width: int = 64, keypoints: int = 16):
        cin = PATCH * PATCH * 3 * (2 if goal else 1) + 2
        self.conv1 = nnx.Conv(cin, width, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(width, width, (3, 3), rngs=rngs)
        self.conv3 = nnx.Conv(width, keypoints, (1, 1), rngs=rngs)
        self.cond = nnx.Embed(n_cond, width, rngs=rngs)
        self.film = nnx.Linear(width, 2 * width, rngs=rngs)
        self.fc1 = nnx.Linear(3 * keypoints + width, 256, rngs=rngs)
        self.fc2 = nnx.Linear(256, len(T.ACTIONS), rngs=rngs)
        self.goal = goal

    def __call__(self, obs, cond, goal=None):
        x = to_latent(obs) if not self.goal else jnp.concatenate([to_latent(obs), to_latent(goal)], axis=-1)
        b, g = x.shape[0], T.GRID
        rows, cols = jnp.meshgrid(jnp.linspace(-1, 1, g), jnp.linspace(-1, 1, g), indexing="ij")
        coords = jnp.broadcast_to(jnp.stack([rows, cols], -1), (b, g, g, 2))
        x = jax.nn.relu(self.conv1(jnp.concatenate([x, coords], -1)))
        c = self.cond(cond)
        scale, shift = jnp.split(self.film(c), 2, axis=-1)
        x = jax.nn.relu(self.conv2(x * (1 + scale[:, None, None]) + shift[:, None, None]))
        logits = self.conv3(x).reshape(b, g * g, -1)
        attn = jax.nn.softmax(logits, axis=1)
        where = jnp.einsum("bnk,nc->bkc", attn, coords[0].reshape(g * g, 2)).reshape(b, -1)
        feats = jnp.concatenate([where, logits.max(axis=1), c], axis=-1)
        return self.fc2(jax.nn.relu(self.fc1(feats)))


def train_policy(cfg: Config, run: Run, data: dict, condition: str, tag: str) -> tuple:
    goal = condition in ("subtask+gen", "subtask+true")
    cond_key = "task" if condition == "task" else "subtask"
    model = Policy(len(T.TASKS) if condition == "task" else len(T.SUBTASKS), goal, rngs=nnx.Rngs(cfg.seed))
    tx = make_optimizer(OptimConfig(lr=cfg.policy_lr, warmup_steps=min(100, cfg.policy_steps // 10),
                                    total_steps=cfg.policy_steps, schedule="cosine", grad_clip=1.0))
    graphdef, state = init_train_state(model, tx)

    def loss_fn(m, batch):
        logits = m(batch["obs"], batch["cond"], batch["goal"] if goal else None)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["action"]).mean()
        return loss, {"acc": (logits.argmax(-1) == batch["action"]).mean()}

    step_fn = make_train_step(graphdef, loss_fn, tx)
    rng = np.random.default_rng(cfg.seed + 4)
    n = len(data["action"])
    for _ in run.progress(range(1, cfg.policy_steps + 1), desc=f"policy {tag}", leave=False):
        idx = rng.integers(n, size=cfg.policy_batch)
        state, metrics = step_fn(state, {"obs": data["obs"][idx], "goal": data["goal"][idx],
                                         "cond": data[cond_key][idx], "action": data["action"][idx]})
    run.log(cfg.policy_steps, phase="policy", condition=condition, tag=tag, loss=float(metrics["loss"]),
            acc=float(metrics["acc"]))
    return graphdef, state.params, goal


def policy_fn(graphdef, params, goal: bool, condition: str):
    @jax.jit
    def logits(params, obs, cond, g):
        return nnx.merge(graphdef, params)(obs, cond, g)

    def act(obs, texts, goals):
        if condition == "task":
            cond = [[T.instruction(t) for t in range(len(T.TASKS))].index(s) for s in texts]
        else:
            cond = [T.SUBTASKS.index(s) for s in texts]
        b = len(obs)
        n = 1 << max(b - 1, 0).bit_length()  # pad to a power of two: a few compiled shapes for any batch
        pad = lambda x: np.concatenate([np.asarray(x), np.zeros((n - b, *np.shape(x)[1:]), np.asarray(x).dtype)])
        g = jnp.asarray(pad(goals)) if goal else None
        out = logits(params, jnp.asarray(pad(obs)), jnp.asarray(pad(np.asarray(cond, np.int32))), g)
        return np.asarray(out)[:b].argmax(-1)

    return act


# ---------------------------------------------------------------------------------------------------------------
# evaluation


def _texts(data: dict, condition: str) -> list[str]:
    """The policy's text input for BC frames: the instruction or the subtask."""
    if condition == "task":
        return [T.instruction(int(t)) for t in data["task"]]
    return [T.SUBTASKS[int(i)] for i in data["subtask"]]


def eval_layouts(cfg: Config) -> list[tuple[int, int]]:
    rng = np.random.default_rng(cfg.seed + 1000)
    return [(int(rng.integers(len(T.TASKS))), int(rng.integers(2**31))) for _ in range(cfg.eval_episodes)]


def true_foresight(envs):
    """Oracle foresight: the frame after the expert finishes the subtask on a copy of the simulator (the current
    frame when the expert cannot, e.g. a block the policy buried)."""
    def fn(frames, texts, ids):
        out = []
        for frame, text, i in zip(frames, texts, ids):
            env = envs[i].copy()
            try:
                T.rollout_subtask(env, text)
                out.append(env.render())
            except (RuntimeError, ValueError):
                out.append(frame)
        return np.asarray(out, np.float32)
    return fn


def evaluate(cfg: Config, policy, condition: str, foresight) -> tuple[np.ndarray, np.ndarray]:
    """(success [E] bool, fraction of the task's subtasks done at the end [E]) over the seeded layouts."""
    layouts = eval_layouts(cfg)
    envs = [T.Tabletop().reset(np.random.default_rng(seed), task) for task, seed in layouts]
    if condition == "task":
        planner = ScriptedPlanner([[T.instruction(e.task_id)] for e in envs], lambda i, s: envs[i].success())
    else:
        planner = ScriptedPlanner([T.subtasks(e.task_id) for e in envs], lambda i, s: envs[i].done(s))
    fs = {"subtask+gen": foresight, "subtask+true": true_foresight(envs)}.get(condition)
    agent = Agent(planner, policy, fs)
    instructions = [T.instruction(e.task_id) for e in envs]
    for _ in range(3 * cfg.max_steps_per_subtask):
        actions, plans = agent.act(np.stack([e.render() for e in envs]).astype(np.float32), instructions)
        if all(p is None for p in plans):
            break
        for env, a in zip(envs, actions):
            if a >= 0:
                env.step(int(a))
    done = [np.mean([e.done(s) for s in T.subtasks(e.task_id)]) for e in envs]
    return np.array([e.success() for e in envs]), np.array(done)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial proportion k / n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# ---------------------------------------------------------------------------------------------------------------


@register("foreact_tabletop", Config, presets={
    "smoke": {"demos": 40, "demo_fractions": (0.25, 1.0), "gen_episodes": 60, "gen_steps": 300, "gen_dim": 64,
              "gen_layers": 2, "gen_batch": 32, "policy_steps": 600, "eval_episodes": 40, "psnr_cases": 32},
    "full": {},
})
def run(cfg: Config, run: Run) -> None:
    """Policy success with / without (generated or true) visual foresight on a toy tabletop."""
    text = ToyText(cfg.seed)
    t0 = time.time()
    generator = train_generator(cfg, run, text)
    run.print(f"generator trained in {time.time() - t0:.0f} s")
    encode = jax.jit(to_latent)
    foresight = GeneratorForesight(generator, encode, jax.jit(from_latent), text, num_steps=cfg.sample_steps,
                                   guidance_scale=cfg.guidance_scale, image_guidance_scale=cfg.image_guidance_scale,
                                   null_frame=cfg.null_frame, chunk=8, seed=cfg.seed)

    # foresight quality on held-out subtasks (first frame of each subtask of fresh expert episodes)
    held = [(p["frames"][0], p["subtask"], p["end"]) for ep in expert_episodes(cfg.psnr_cases, cfg.seed + 5)
            for p in ep["parts"]][: cfg.psnr_cases]
    frames = np.asarray([h[0] for h in held], np.float32)
    ends = np.asarray([h[2] for h in held], np.float32)
    generated = foresight(frames, [h[1] for h in held])
    gen_psnr, copy_psnr = psnr(generated, ends), psnr(frames, ends)
    single = dataclasses.replace(foresight, chunk=1, calls=0)
    ms = 1000 * best_time(lambda: single(frames[:1], [held[0][1]]), repeats=5)
    quality = [{"metric": "foresight PSNR (dB), generated vs true end frame", "value": float(gen_psnr.mean())},
               {"metric": "PSNR (dB), current frame vs true end frame (copy baseline)",
                "value": float(copy_psnr.mean())},
               {"metric": f"ms per foresight (1 frame, {cfg.sample_steps} steps x 3 CFG branches, CPU)", "value": ms}]
    run.results(quality, title="Foresight generator")
    run.savez("foresight_examples.npz", frames=frames[:16], generated=generated[:16], true=ends[:16])
    _example_plot(run, frames[:8], generated[:8], ends[:8], [h[1] for h in held[:8]])

    demos = expert_episodes(cfg.demos, cfg.seed + 6, cfg.expert_noise)
    held_out = bc_arrays(expert_episodes(max(cfg.demos // 5, 4), cfg.seed + 7))  # held-out expert frames
    rows = []
    for frac in cfg.demo_fractions:
        n = max(1, round(frac * cfg.demos))
        data = augmented(bc_arrays(demos[:n])) if cfg.augment else bc_arrays(demos[:n])
        trained = {}
        for condition in CONDITIONS:
            # the goal-conditioned policy is trained once, on true end frames (as the released scripts), and
            # evaluated with generated and with true foresight
            key = "goal" if condition in ("subtask+gen", "subtask+true") else condition
            if key not in trained:
                trained[key] = train_policy(cfg, run, data, condition, f"{key} {n} demos")
            act = policy_fn(*trained[key], condition)
            acc = float(np.mean(act(held_out["obs"], _texts(held_out, condition), held_out["goal"])
                                == held_out["action"]))
            succ, done = evaluate(cfg, act, condition, foresight)
            lo, hi = wilson(int(succ.sum()), len(succ))
            rows.append({"condition": condition, "demos": n, "success": float(succ.mean()), "ci95_low": lo,
                         "ci95_high": hi, "subtasks_done": float(done.mean()), "heldout_action_acc": acc,
                         "episodes": len(succ)})
            run.log(0, phase="eval", **rows[-1])
            run.print(f"{condition:13s} {n:4d} demos: success {succ.mean():.3f} [{lo:.3f}, {hi:.3f}], subtasks "
                      f"done {done.mean():.3f}, held-out action accuracy {acc:.3f}")
    run.results(rows, title=f"Success over {cfg.eval_episodes} seeded episodes (Wilson 95% CI)",
                note=_note(rows))
    run.save_json("results.json", {"quality": quality, "success": rows})
    _success_plot(run, rows)


def _note(rows) -> str:
    by = {(r["condition"], r["demos"]): r["success"] for r in rows}
    lines = []
    for n in sorted({r["demos"] for r in rows}):
        s = {c: by[(c, n)] for c in CONDITIONS}
        lines.append(f"- {n} demos, success: generated foresight "
                     f"{'beats' if s['subtask+gen'] > s['subtask'] else 'does not beat'} subtask text "
                     f"({s['subtask+gen']:.2f} vs {s['subtask']:.2f}); true foresight {s['subtask+true']:.2f}; "
                     f"task text {s['task']:.2f}")
    return ("Planner: scripted oracle (no VLM). Policies with foresight are trained on true end frames and "
            "evaluated with generated (subtask+gen) or oracle (subtask+true) ones. heldout_action_acc: agreement with "
            "the expert on held-out expert frames given the true end frame (so equal for the two goal rows).\n"
            + "\n".join(lines))


def _example_plot(run: Run, frames, generated, ends, texts) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(frames), figsize=(1.4 * len(frames), 4.6))
    for j in range(len(frames)):
        for i, (img, name) in enumerate(((frames, "current"), (generated, "generated"), (ends, "true end"))):
            axes[i, j].imshow((np.asarray(img[j]) + 1) / 2, interpolation="nearest")
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
            if j == 0:
                axes[i, j].set_ylabel(name, fontsize=8)
        axes[0, j].set_title(texts[j].replace("put the ", "").replace(" block", ""), fontsize=6)
    run.savefig(fig, "foresight_examples.png")


def _success_plot(run: Run, rows) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for condition in CONDITIONS:
        rs = sorted((r for r in rows if r["condition"] == condition), key=lambda r: r["demos"])
        x = [r["demos"] for r in rs]
        y = [r["success"] for r in rs]
        err = [[r["success"] - r["ci95_low"] for r in rs], [r["ci95_high"] - r["success"] for r in rs]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=condition)
    ax.set_xlabel("expert demonstrations")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    run.savefig(fig, "success.png")
