"""foreact_tabletop: ForeAct's mechanism at toy scale: does a policy given an imagined subtask-end frame (foresight)
beat one given only text?

World (`jaxeff.foreact.tabletop`): a rendered 32x32 tabletop (8x8 cells) with a gripper, three coloured blocks and
three pads; 12 multi-step tasks (sort onto pads / stack, in every order), 3 subtasks each; a scripted expert. One
action is a whole pick-and-place primitive (pick cell, place cell), so one correct action completes a subtask.
Planner: `ScriptedPlanner`, an oracle subtask decomposer and monitor reading the simulator. **No VLM is involved.**

Generator: trained here with the official recipe (rectified flow, uniform t, the official CFG dropout to the
empty caption / a black source) to predict the subtask-end frame from the subtask-start frame and the subtask text,
on `gen_episodes` action-free expert episodes (many more than the policy's demos: the paper's generator is
pretrained on broad video, its policy has few demos), and sampled with the official Flow-DPM-Solver++ (8 steps) and
3-way CFG; the null source is the official mid-grey (`null_frame=grey`) or the black image training dropped to
(`null_frame=black`, what the presets use). `generator=cells` (default): `CellGenerator`, a per-cell flow network
with the generator's call signature; `generator=sana`: ForeAct's own image-edit SANA transformer, tiny config,
which did not learn at this scale (no positional embedding; `latent_coords` adds fixed coordinate channels to the
latents; see the package README). "Latents" are the pixels, space-to-depth by 4 (one token per cell, 8x8x48,
lossless). The caption features are frozen random word embeddings (standing in for the frozen Gemma-2), always
starting with a start token (the official prompts keep their system prompt when the caption is empty).

Policy: a per-cell network (1x1 convolutions over the 8x8 cells: translation-equivariant) with two heads, a pick
and a place logit per cell; the text enters as a learned embedding per distinct string, by FiLM together with a
global max-pool of the cell features. Four conditions (as in the released pi0.5 scripts, the goal-conditioned
policy is trained with ground-truth goals and evaluated with generated or true ones):
- task: the task instruction only (the pi0 "flat" baseline; the planner only says when the task is done);
- subtask: the current subtask text;
- subtask+gen: subtask + the generated foresight (its cells, and their difference to the current ones);
- subtask+true: subtask + the true subtask-end frame (the expert's primitive on a copy of the simulator).
The behaviour-cloning data can be augmented with all 6 colour permutations (label-preserving; `augment`).
Metrics: success over seeded evaluation episodes (the same layouts for every condition; `max_actions` primitives
per episode) with Wilson 95% intervals, vs the number of demos; foresight PSNR to the true end frame next to
copying the current frame; milliseconds per foresight (one frame, 8 steps x 3 CFG branches, after compilation).

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

from jaxeff.data import psnr
from jaxeff.experiment import Run, best_time, register, wilson_interval
from jaxeff.foreact import tabletop as T
from jaxeff.foreact.config import SanaConfig
from jaxeff.foreact.generator import ForesightGenerator
from jaxeff.foreact.planner import Agent, GeneratorForesight, ScriptedPlanner
from jaxeff.foreact.sana import TIMESTEP_CHANNELS, timestep_features
from jaxeff.foreact.training import apply_cfg_dropout, flow_matching_loss, training_draws
from jaxeff.train import OptimConfig, init_train_state, make_optimizer, make_train_step, merge

CONDITIONS = ("task", "subtask", "subtask+gen", "subtask+true")
PATCH = T.CELL  # space-to-depth factor of the pixel "latents": one token per cell
PIXEL_CHANNELS = PATCH * PATCH * 3
TEXT_DIM = 32


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    demos: tuple[int, ...] = (1, 2, 3, 5, 10, 30)
    generator: str = "cells"  # "cells": the per-cell flow network below; "sana": ForeAct's SANA (see README)
    gen_episodes: int = 4000
    gen_steps: int = 6000
    gen_batch: int = 64
    gen_lr: float = 2e-3
    gen_dim: int = 128
    gen_layers: int = 3
    latent_coords: int = 0  # coordinate channels in the latents (for generator=sana: it has no positions)
    policy_steps: int = 400
    policy_batch: int = 64
    policy_lr: float = 3e-3
    augment: bool = False  # all 6 colour permutations of the BC data: makes text grounding easy (see README)
    eval_episodes: int = 200
    max_actions: int = 6
    sample_steps: int = 8
    guidance_scale: float = 4.5
    image_guidance_scale: float = 1.5
    null_frame: str = "grey"
    psnr_cases: int = 128

    def validate(self):
        if not self.demos or min(self.demos) < 1:
            raise ValueError(f"demos must be positive demo counts, got {self.demos}")
        if self.generator not in ("cells", "sana"):
            raise ValueError(f"generator must be cells or sana, got {self.generator!r}")
        if self.null_frame not in ("grey", "black"):
            raise ValueError(f"null_frame must be grey or black, got {self.null_frame!r}")
        if min(self.gen_episodes, self.gen_steps, self.policy_steps, self.eval_episodes, self.max_actions,
               self.psnr_cases) < 1:
            raise ValueError("gen_episodes, gen_steps, policy_steps, eval_episodes, max_actions and psnr_cases "
                             "must be >= 1")
        if self.gen_dim % 32:
            raise ValueError(f"gen_dim must be a multiple of 32 (head size), got {self.gen_dim}")
        if self.latent_coords % 4:
            raise ValueError(f"latent_coords must be a multiple of 4 (sin/cos of rows and columns), got "
                             f"{self.latent_coords}")


# ---------------------------------------------------------------------------------------------------------------
# data


def expert_episodes(n: int, seed: int) -> list[dict]:
    """n expert episodes on random tasks and layouts: per subtask, the start frame, the expert's primitive
    (pick, place) and the end frame."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        task = int(rng.integers(len(T.TASKS)))
        env = T.Tabletop().reset(rng, task)
        parts = []
        for sub in T.subtasks(task):
            start, action = env.render(), T.expert_action(env, sub)
            env.step(*action)
            parts.append({"subtask": sub, "start": start, "action": action, "end": env.render()})
        out.append({"task": task, "parts": parts})
    return out


def bc_arrays(episodes: list[dict]) -> dict[str, np.ndarray]:
    """Behaviour-cloning arrays, one row per subtask: obs / goal frames, pick / place cells, task / subtask ids."""
    rows = [(p["start"], p["end"], *p["action"], ep["task"], T.SUBTASKS.index(p["subtask"]))
            for ep in episodes for p in ep["parts"]]
    obs, goal, pick, place, task, sub = zip(*rows)
    i32 = lambda x: np.asarray(x, np.int32)
    return {"obs": np.asarray(obs, np.float32), "goal": np.asarray(goal, np.float32), "pick": i32(pick),
            "place": i32(place), "task": i32(task), "subtask": i32(sub)}


def permute_colours(data: dict[str, np.ndarray], perm: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """The BC arrays with block / pad colour i renamed perm[i] in the frames, goals, subtasks and tasks (a
    label-preserving augmentation: the expert's cells do not depend on which colour is which)."""
    def recolour(frames):
        out = frames.copy()
        for table in (T.BLOCK_RGB, T.PAD_RGB):
            rgb = table / 127.5 - 1.0
            masks = [np.all(np.abs(frames - rgb[i]) < 1e-4, axis=-1) for i in range(3)]
            for i, m in enumerate(masks):
                out[m] = rgb[perm[i]]
        return out

    def rename(text):
        return " ".join(T.COLOURS[perm[T.COLOURS.index(w)]] if w in T.COLOURS else w for w in text.split())

    sub_map = np.array([T.SUBTASKS.index(rename(s)) for s in T.SUBTASKS], np.int32)
    task_map = np.array([T.TASKS.index((kind, tuple(perm[i] for i in order))) for kind, order in T.TASKS], np.int32)
    return {**data, "obs": recolour(data["obs"]), "goal": recolour(data["goal"]),
            "task": task_map[data["task"]], "subtask": sub_map[data["subtask"]]}


def augmented(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`data` under all 6 colour permutations, concatenated."""
    parts = [permute_colours(data, perm) for perm in T.ORDERS]
    return {k: np.concatenate([p[k] for p in parts]) for k in data}


def cells(frames):
    """[B, 32, 32, 3] -> [B, 8, 8, 48]: space-to-depth, one vector per cell (lossless)."""
    b, h, w, c = frames.shape
    x = frames.reshape(b, h // PATCH, PATCH, w // PATCH, PATCH, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // PATCH, w // PATCH, PATCH * PATCH * c)


def coord_channels(n: int) -> np.ndarray:
    """[GRID, GRID, n] fixed sin/cos codes of the row and column (n / 4 frequencies each), in [-1, 1]."""
    angle = (np.arange(T.GRID)[:, None] + 0.5) * np.pi / T.GRID * 2.0 ** np.arange(n // 4)[None]
    code = np.concatenate([np.sin(angle), np.cos(angle)], -1)  # [GRID, n / 2]
    rows = np.broadcast_to(code[:, None], (T.GRID, T.GRID, n // 2))
    cols = np.broadcast_to(code[None, :], (T.GRID, T.GRID, n // 2))
    return np.concatenate([rows, cols], -1).astype(np.float32)


def latent_codec(n_coords: int):
    """(encode, decode) of the toy's pixel latent space: frames [B, 32, 32, 3] <-> [B, 8, 8, 48 + n_coords]."""
    coords = jnp.asarray(coord_channels(n_coords)) if n_coords else None

    def encode(frames):
        x = cells(jnp.asarray(frames, jnp.float32))
        if coords is None:
            return x
        return jnp.concatenate([x, jnp.broadcast_to(coords, (*x.shape[:3], n_coords))], -1)

    def decode(lat):
        b, h, w, _ = lat.shape
        x = lat[..., :PIXEL_CHANNELS].reshape(b, h, w, PATCH, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
        return jnp.clip(x.reshape(b, h * PATCH, w * PATCH, 3), -1.0, 1.0)

    return jax.jit(encode), jax.jit(decode)


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
    heads, ch = cfg.gen_dim // 32, PIXEL_CHANNELS + cfg.latent_coords
    return SanaConfig(in_channels=ch, out_channels=ch, num_layers=cfg.gen_layers, num_attention_heads=heads,
                      attention_head_dim=32, num_cross_attention_heads=heads, cross_attention_head_dim=32,
                      cross_attention_dim=cfg.gen_dim, caption_channels=TEXT_DIM)


class CellGenerator(nnx.Module):
    """A per-cell flow model with `ForesightGenerator`'s call signature, so the official training loss, CFG dropout
    and 3-way-CFG sampler run it unchanged. Per cell, from (its noisy value, the source frame's same cell) through
    1x1 convolutions FiLM-modulated by the timestep features, the caption (its [L, C] features flattened: word
    order matters) and a global max-pool of the cell features, it predicts the clean cell as the source cell plus
    a correction (zero at init: the untrained model copies the current frame) and returns the velocity that
    prediction implies, (x_t - x0) / sigma with sigma = t / 1000 (at least `sigma_min`). The toy's end frame is a
    per-cell function of the start frame and the subtask (which block leaves which cell, which cell receives it),
    which is what this network can express; the tiny NoPE SANA had first to learn where each token is."""

    sigma_min = 0.05

    def __init__(self, channels: int, caption_shape: tuple[int, int], *, rngs: nnx.Rngs, width: int = 128,
                 layers: int = 3):
        self.embed = nnx.Conv(2 * channels, width, (1, 1), rngs=rngs)
        self.time = nnx.Linear(TIMESTEP_CHANNELS, width, rngs=rngs)
        self.text = nnx.Linear(caption_shape[0] * caption_shape[1], width, rngs=rngs)
        self.films = nnx.List([nnx.Linear(2 * width, 2 * width, rngs=rngs) for _ in range(layers)])
        self.convs = nnx.List([nnx.Conv(width, width, (1, 1), rngs=rngs) for _ in range(layers)])
        self.out = nnx.Conv(width, channels, (1, 1), kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, targets, sources, timestep, caption, caption_mask, view_ids=None):
        if len(targets) != 1 or len(sources) != 1:
            raise ValueError(f"CellGenerator is single-view, got {len(targets)} targets / {len(sources)} sources")
        b = targets[0].shape[0]
        words = (caption * caption_mask[..., None]).reshape(b, -1)
        cond = jax.nn.silu(self.time(timestep_features(timestep))) + jax.nn.silu(self.text(words))
        h = jax.nn.silu(self.embed(jnp.concatenate([targets[0], sources[0]], -1)))
        for film, conv in zip(self.films, self.convs):
            scale, shift = jnp.split(film(jnp.concatenate([cond, h.max(axis=(1, 2))], -1)), 2, -1)
            h = h + conv(jax.nn.silu(h * (1 + scale[:, None, None]) + shift[:, None, None]))
        x0 = sources[0] + self.out(h)
        sigma = jnp.maximum(jnp.asarray(timestep, jnp.float32) / 1000.0, self.sigma_min)[:, None, None, None]
        return [(targets[0] - x0) / sigma]


def build_generator(cfg: Config, caption_shape: tuple[int, int]) -> nnx.Module:
    """The foresight generator of `cfg.generator` (random init)."""
    if cfg.generator == "sana":
        return ForesightGenerator(gen_config(cfg), rngs=nnx.Rngs(cfg.seed))
    return CellGenerator(PIXEL_CHANNELS + cfg.latent_coords, caption_shape, rngs=nnx.Rngs(cfg.seed),
                         width=cfg.gen_dim, layers=cfg.gen_layers)


def train_generator(cfg: Config, run: Run, text: ToyText, encode) -> nnx.Module:
    """The generator trained on (subtask-start, subtask-end, subtask) triples of `gen_episodes` expert episodes."""
    parts = [p for ep in expert_episodes(cfg.gen_episodes, cfg.seed + 1) for p in ep["parts"]]
    src = np.asarray(encode(np.asarray([p["start"] for p in parts])))
    tgt = np.asarray(encode(np.asarray([p["end"] for p in parts])))
    cap_ids = np.asarray([T.SUBTASKS.index(p["subtask"]) for p in parts], np.int32)
    sub_feats, sub_mask = text(list(T.SUBTASKS))
    null_feats, null_mask = text([""])
    black = encode(-np.ones((1, T.SIZE, T.SIZE, 3), np.float32))
    run.print(f"generator data: {len(src)} (start, end) frame pairs from {cfg.gen_episodes} action-free episodes")

    model = build_generator(cfg, sub_feats.shape[1:])
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


# ---------------------------------------------------------------------------------------------------------------
# policy


class Policy(nnx.Module):
    """Per-cell pick-and-place policy: each cell's pixels (with a goal: also the goal frame's cell and the
    difference) -> 1x1 convolution -> FiLM from the condition embedding and a global max-pool of the cell features
    -> 1x1 convolutions -> (pick, place) logits per cell, [B, 2, CELLS]. Translation-equivariant up to the global
    context, so what it learns on one cell holds on every cell."""

    def __init__(self, n_cond: int, goal: bool, *, rngs: nnx.Rngs, width: int = 64):
        self.embed = nnx.Conv(PIXEL_CHANNELS * (3 if goal else 1), width, (1, 1), rngs=rngs)
        self.cond = nnx.Embed(n_cond, width, rngs=rngs)
        self.film = nnx.Linear(2 * width, 2 * width, rngs=rngs)
        self.mix = nnx.Conv(width, width, (1, 1), rngs=rngs)
        self.head = nnx.Conv(width, 2, (1, 1), rngs=rngs)
        self.goal = goal

    def __call__(self, obs, cond, goal=None):
        x = cells(obs)
        if self.goal:
            g = cells(goal)
            x = jnp.concatenate([x, g, g - x], -1)
        h = jax.nn.relu(self.embed(x))
        ctx = jnp.concatenate([self.cond(cond), h.max(axis=(1, 2))], -1)
        scale, shift = jnp.split(self.film(ctx), 2, axis=-1)
        h = jax.nn.relu(self.mix(h * (1 + scale[:, None, None]) + shift[:, None, None]))
        return self.head(h).reshape(x.shape[0], T.CELLS, 2).transpose(0, 2, 1)


def train_policy(cfg: Config, run: Run, data: dict, condition: str, tag: str) -> tuple:
    goal = condition in ("subtask+gen", "subtask+true")
    cond_key = "task" if condition == "task" else "subtask"
    model = Policy(len(T.TASKS) if condition == "task" else len(T.SUBTASKS), goal, rngs=nnx.Rngs(cfg.seed))
    tx = make_optimizer(OptimConfig(lr=cfg.policy_lr, warmup_steps=min(50, cfg.policy_steps // 10),
                                    total_steps=cfg.policy_steps, schedule="cosine", grad_clip=1.0))
    graphdef, state = init_train_state(model, tx)

    def loss_fn(m, batch):
        logits = m(batch["obs"], batch["cond"], batch["goal"] if goal else None)
        labels = jnp.stack([batch["pick"], batch["place"]], 1)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum(1).mean()
        return loss, {"acc": jnp.all(logits.argmax(-1) == labels, 1).mean()}

    step_fn = make_train_step(graphdef, loss_fn, tx)
    rng = np.random.default_rng(cfg.seed + 4)
    n = len(data["pick"])
    for _ in run.progress(range(1, cfg.policy_steps + 1), desc=f"policy {tag}", leave=False):
        idx = rng.integers(n, size=cfg.policy_batch)
        state, metrics = step_fn(state, {"obs": data["obs"][idx], "goal": data["goal"][idx],
                                         "cond": data[cond_key][idx], "pick": data["pick"][idx],
                                         "place": data["place"][idx]})
    run.log(cfg.policy_steps, phase="policy", condition=condition, tag=tag, loss=float(metrics["loss"]),
            acc=float(metrics["acc"]))
    return graphdef, state.params, goal


def policy_fn(graphdef, params, goal: bool, condition: str):
    """The trained policy as the Agent's callable: (frames, texts, goals) -> primitives [B, 2] (pick, place)."""
    @jax.jit
    def logits(params, obs, cond, g):
        return nnx.merge(graphdef, params)(obs, cond, g)

    instructions = [T.instruction(t) for t in range(len(T.TASKS))]

    def act(obs, texts, goals):
        cond = [(instructions if condition == "task" else T.SUBTASKS).index(s) for s in texts]
        b = len(obs)
        n = 1 << max(b - 1, 0).bit_length()  # pad to a power of two: a few compiled shapes for any batch
        pad = lambda x: np.concatenate([np.asarray(x), np.zeros((n - b, *np.shape(x)[1:]), np.asarray(x).dtype)])
        g = jnp.asarray(pad(goals)) if goal else None
        out = logits(params, jnp.asarray(pad(obs)), jnp.asarray(pad(np.asarray(cond, np.int32))), g)
        return np.asarray(out)[:b].argmax(-1)

    return act


# ---------------------------------------------------------------------------------------------------------------
# evaluation


def eval_layouts(cfg: Config) -> list[tuple[int, int]]:
    rng = np.random.default_rng(cfg.seed + 1000)
    return [(int(rng.integers(len(T.TASKS))), int(rng.integers(2**31))) for _ in range(cfg.eval_episodes)]


def true_foresight(envs):
    """Oracle foresight: the frame after the expert's primitive on a copy of the simulator (the current frame when
    the expert cannot do the subtask, e.g. a block the policy buried)."""
    def fn(frames, texts, ids):
        out = []
        for frame, text, i in zip(frames, texts, ids):
            env = envs[i].copy()
            try:
                env.step(*T.expert_action(env, text))
                out.append(env.render())
            except ValueError:
                out.append(frame)
        return np.asarray(out, np.float32)
    return fn


def evaluate(cfg: Config, policy, condition: str, foresight) -> tuple[np.ndarray, np.ndarray, list]:
    """(success [E] bool, fraction of the task's subtasks done at the end [E], the Agent's plan_seconds) over the
    seeded layouts, `max_actions` primitives per episode."""
    envs = [T.Tabletop().reset(np.random.default_rng(seed), task) for task, seed in eval_layouts(cfg)]
    if condition == "task":
        planner = ScriptedPlanner([[T.instruction(e.task_id)] for e in envs], lambda i, s: envs[i].success())
    else:
        planner = ScriptedPlanner([T.subtasks(e.task_id) for e in envs], lambda i, s: envs[i].done(s))
    fs = {"subtask+gen": foresight, "subtask+true": true_foresight(envs)}.get(condition)
    agent = Agent(planner, policy, fs)
    instructions = [T.instruction(e.task_id) for e in envs]
    for _ in range(cfg.max_actions):
        actions, plans = agent.act(np.stack([e.render() for e in envs]), instructions)
        if all(p is None for p in plans):
            break
        for env, a, p in zip(envs, actions, plans):
            if p is not None:
                env.step(*a)
    done = [np.mean([e.done(s) for s in T.subtasks(e.task_id)]) for e in envs]
    return np.array([e.success() for e in envs]), np.array(done), agent.plan_seconds


# ---------------------------------------------------------------------------------------------------------------


@register("foreact_tabletop", Config, presets={
    "smoke": {"demos": (1, 3, 10), "gen_episodes": 2000, "gen_steps": 3000, "null_frame": "black",
              "policy_steps": 200, "eval_episodes": 100, "psnr_cases": 64},
    "full": {"null_frame": "black"},
})
def run(cfg: Config, run: Run) -> None:
    """Policy success with / without (generated or true) visual foresight on a toy tabletop."""
    text = ToyText(cfg.seed)
    encode, decode = latent_codec(cfg.latent_coords)
    t0 = time.time()
    generator = train_generator(cfg, run, text, encode)
    run.print(f"generator trained in {time.time() - t0:.0f} s")
    foresight = GeneratorForesight(generator, encode, decode, text, num_steps=cfg.sample_steps,
                                   guidance_scale=cfg.guidance_scale, image_guidance_scale=cfg.image_guidance_scale,
                                   null_frame=cfg.null_frame, chunk=8, seed=cfg.seed)

    # foresight quality on held-out subtasks of fresh expert episodes
    held = [p for ep in expert_episodes(cfg.psnr_cases, cfg.seed + 5) for p in ep["parts"]][: cfg.psnr_cases]
    frames = np.asarray([p["start"] for p in held])
    ends = np.asarray([p["end"] for p in held])
    generated = foresight(frames, [p["subtask"] for p in held])
    gen_psnr, copy_psnr = psnr(generated, ends), psnr(frames, ends)
    other = "black" if cfg.null_frame == "grey" else "grey"
    other_psnr = psnr(dataclasses.replace(foresight, null_frame=other, calls=0)(frames, [p["subtask"] for p in held]),
                      ends)
    single = dataclasses.replace(foresight, chunk=1, calls=0)
    ms = 1000 * best_time(lambda: single(frames[:1], [held[0]["subtask"]]), repeats=5)
    quality = [{"metric": f"foresight PSNR (dB), generated vs true end frame (null_frame={cfg.null_frame})",
                "value": float(gen_psnr.mean())},
               {"metric": f"foresight PSNR (dB), generated vs true end frame (null_frame={other})",
                "value": float(other_psnr.mean())},
               {"metric": "PSNR (dB), current frame vs true end frame (copy baseline)",
                "value": float(copy_psnr.mean())},
               {"metric": f"ms per foresight (1 frame, {cfg.sample_steps} steps x 3 CFG branches, CPU)", "value": ms}]
    run.results(quality, title="Foresight generator")
    run.savez("foresight_examples.npz", frames=frames[:16], generated=generated[:16], true=ends[:16])
    _example_plot(run, frames[:8], generated[:8], ends[:8], [p["subtask"] for p in held[:8]])

    demos = expert_episodes(max(cfg.demos), cfg.seed + 6)
    rows = []
    for n in sorted(cfg.demos):
        data = augmented(bc_arrays(demos[:n])) if cfg.augment else bc_arrays(demos[:n])
        trained = {}
        for condition in CONDITIONS:
            # the goal-conditioned policy is trained once, on true end frames (as the released scripts), and
            # evaluated with generated and with true foresight
            key = "goal" if condition in ("subtask+gen", "subtask+true") else condition
            if key not in trained:
                trained[key] = train_policy(cfg, run, data, condition, f"{key} {n} demos")
            succ, done, _ = evaluate(cfg, policy_fn(*trained[key], condition), condition, foresight)
            lo, hi = wilson_interval(int(succ.sum()), len(succ))
            rows.append({"condition": condition, "demos": n, "success": float(succ.mean()), "ci95_low": lo,
                         "ci95_high": hi, "subtasks_done": float(done.mean()), "episodes": len(succ)})
            run.log(0, phase="eval", **rows[-1])
            run.print(f"{condition:13s} {n:4d} demos: success {succ.mean():.3f} [{lo:.3f}, {hi:.3f}], subtasks "
                      f"done {done.mean():.3f}")
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
    return ("Planner: scripted oracle (no VLM). One action = one pick-and-place primitive. The policy with foresight "
            "is trained on true end frames and evaluated with generated (subtask+gen) or oracle (subtask+true) "
            "ones.\n" + "\n".join(lines))


def _example_plot(run: Run, frames, generated, ends, texts) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(frames), figsize=(1.4 * len(frames), 4.6), squeeze=False)
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
        err = [[max(r["success"] - r["ci95_low"], 0) for r in rs], [max(r["ci95_high"] - r["success"], 0) for r in rs]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=condition)
    ax.set_xscale("log")
    ax.set_xlabel("expert demonstrations")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    run.savefig(fig, "success.png")
