"""ForeAct's control loop (paper Sec. 3; the planner is not released): a planner proposes the current subtask and
monitors its completion, the foresight generator imagines the frame at the subtask's end, and the policy acts on the
observation, the subtask text and the foresight as an extra camera image.

Everything is batched over B environments (B = 1 for a single robot). The pieces are plain callables:
- `Planner.plan(observations, instructions) -> list[str | None]`: the current subtask per environment, None once
  the task is done. `ScriptedPlanner` is an oracle decomposer/monitor over a subtask list (what the toy uses; no
  VLM involved); `VLMPlanner` asks any `ask(image, prompt) -> str` model (e.g. a jaxeff NVILA) the two questions
  the paper's Qwen3-VL planner answers; it has only been run with scripted `ask` functions in tests.
- `foresight(observations [b, H, W, 3], subtasks list[str], env_ids list[int]) -> images [b, H, W, 3]`, called
  only for the environments whose subtask changed (`GeneratorForesight` wraps the generator and ignores env_ids;
  an oracle reading the simulators, or None, also fit).
- `policy(observations [B, ...], subtasks list[str], foresight [B, ...] | None) -> actions [B, ...]`, one row
  per environment (the toy's are [B, 2] pick-and-place cells).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.checks import require_int
from jaxeff.data.images import require_float
from jaxeff.foreact.generator import ForesightGenerator
from jaxeff.foreact.sampling import GUIDANCE_SCALE, IMAGE_GUIDANCE_SCALE, sample


class Planner(Protocol):
    def plan(self, observations: np.ndarray, instructions: Sequence[str]) -> list[str | None]: ...


@dataclasses.dataclass
class ScriptedPlanner:
    """Oracle planner: environment i's subtasks are `subtasks[i]` in order; `done(i, subtask) -> bool` is the
    monitor (e.g. reading the simulator state). The current subtask is the first one not done."""

    subtasks: Sequence[Sequence[str]]
    done: Callable[[int, str], bool]

    def plan(self, observations, instructions) -> list[str | None]:
        return [next((s for s in subs if not self.done(i, s)), None) for i, subs in enumerate(self.subtasks)]


PROPOSE = ("Task: {instruction}\nCompleted subtasks: {completed}\nLooking at the image, what is the next subtask? "
           "Answer with one short imperative sentence, or DONE if the task is complete.")
CHECK = "Is the subtask \"{subtask}\" complete in this image? Answer yes or no."


@dataclasses.dataclass
class VLMPlanner:
    """A planner/monitor backed by a vision-language model `ask(image, prompt) -> str` (the paper uses
    Qwen3-VL-8B-Instruct; not released). Per environment it keeps the completed subtasks; each call first asks
    whether the current subtask is complete (CHECK), then proposes the next one (PROPOSE; "DONE" ends the task)."""

    ask: Callable[[np.ndarray, str], str]
    propose: str = PROPOSE
    check: str = CHECK
    state: dict = dataclasses.field(default_factory=dict)

    def plan(self, observations, instructions) -> list[str | None]:
        out = []
        for i, (obs, instruction) in enumerate(zip(observations, instructions)):
            completed, current = self.state.setdefault(i, ([], None))
            if current is not None and self.ask(obs, self.check.format(subtask=current)).strip().lower()[:3] == "yes":
                completed.append(current)
                current = None
            if current is None:
                answer = self.ask(obs, self.propose.format(instruction=instruction,
                                                           completed="; ".join(completed) or "none")).strip()
                current = None if answer.upper().startswith("DONE") else answer
            self.state[i] = (completed, current)
            out.append(current)
        return out


@dataclasses.dataclass
class Agent:
    """Planner + foresight + policy over B environments. `act(observations, instructions)` -> (actions [B, ...]
    (the policy's actions, e.g. [B] discrete moves or [B, 2] pick-and-place cells; -1 rows where the task is done),
    subtasks); foresight is refreshed for an environment when its subtask changes and kept
    until the next change. `plan_seconds` records (batch size, seconds) per foresight call."""

    planner: Planner
    policy: Callable[[np.ndarray, list[str], np.ndarray | None], np.ndarray]
    foresight: Callable[[np.ndarray, list[str], list[int]], np.ndarray] | None = None
    subtasks: list = dataclasses.field(default_factory=list)
    goals: np.ndarray | None = None
    plan_seconds: list = dataclasses.field(default_factory=list)
    action_shape: tuple = ()

    def act(self, observations: np.ndarray, instructions: Sequence[str]) -> tuple[np.ndarray, list[str | None]]:
        b = len(observations)
        plans = self.planner.plan(observations, instructions)
        if len(self.subtasks) != b:
            self.subtasks = [None] * b
        changed = [i for i in range(b) if plans[i] is not None and plans[i] != self.subtasks[i]]
        if self.foresight is not None and changed:
            if self.goals is None or len(self.goals) != b:
                self.goals = np.zeros_like(np.asarray(observations))
            t0 = time.perf_counter()
            new = np.asarray(self.foresight(np.asarray(observations)[changed], [plans[i] for i in changed], changed))
            self.plan_seconds.append((len(changed), time.perf_counter() - t0))
            self.goals[changed] = new
        self.subtasks = list(plans)
        live = [i for i in range(b) if plans[i] is not None]
        if not live:
            return np.full((b, *self.action_shape), -1, np.int64), plans
        goals = None if self.foresight is None else self.goals[live]
        out = np.asarray(self.policy(np.asarray(observations)[live], [plans[i] for i in live], goals))
        self.action_shape = out.shape[1:]
        actions = np.full((b, *self.action_shape), -1, out.dtype)
        actions[live] = out
        return actions, plans


@dataclasses.dataclass
class GeneratorForesight:
    """The generator as a foresight function: frames -> latents (`encode`), subtask texts -> caption features
    (`encode_text(list[str]) -> (features [b, L, C], mask [b, L])`), 3-way CFG sampling, latents -> frames
    (`decode`). The null source for image guidance is `encode(null_frame)`: "grey" (zeros in [-1, 1], the official
    inference) or "black" (-1, what training dropped to); None = 2-way text guidance.

    Frames are sampled in chunks of at most `chunk`; a call with b frames pads each chunk to
    min(chunk, the power of two >= b) frames, so a single foresight costs one frame of work and at most
    log2(chunk) + 1 batch shapes are ever compiled."""

    generator: ForesightGenerator  # or any module with its call signature (the toy's CellGenerator)
    encode: Callable[[jax.Array], jax.Array]
    decode: Callable[[jax.Array], jax.Array]
    encode_text: Callable[[list[str]], tuple[jax.Array, jax.Array]]
    num_steps: int = 8
    guidance_scale: float = GUIDANCE_SCALE
    image_guidance_scale: float = IMAGE_GUIDANCE_SCALE
    null_frame: str | None = "grey"
    chunk: int = 8
    seed: int = 0
    calls: int = 0

    def __post_init__(self):
        if self.null_frame not in ("grey", "black", None):
            raise ValueError(f"null_frame must be 'grey', 'black' or None, got {self.null_frame!r}")
        self.chunk = require_int(self.chunk, "chunk", 1)

    def __call__(self, frames: np.ndarray, texts: Sequence[str], env_ids=None) -> np.ndarray:
        """frames [b, H, W, 3] float in [-1, 1] and one subtask text per frame -> foresight frames [b, H, W, 3]
        (the decoder's range, [-1, 1] for DC-AE). Raises ValueError for integer frames (e.g. uint8 in [0, 255]),
        frames that are not [b, H, W, C] with b >= 1, a bare str or a text count other than b."""
        require_float(frames, "GeneratorForesight", convert="frames.astype(np.float32) / 127.5 - 1")
        frames = np.asarray(frames, np.float32)
        if frames.ndim != 4 or not len(frames):
            raise ValueError(f"GeneratorForesight: frames must be [b, H, W, C] with b >= 1, got {frames.shape}")
        if isinstance(texts, str):
            raise ValueError(f"GeneratorForesight: texts must be a list of str, one per frame, got one str "
                             f"{texts[:40]!r}: pass [text]")
        if len(texts) != len(frames) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"GeneratorForesight: need one str text per frame, got {len(texts)} texts for "
                             f"{len(frames)} frames")
        n = min(self.chunk, 1 << (len(frames) - 1).bit_length())
        return np.concatenate([self._chunk(frames[i : i + n], texts[i : i + n], n)
                               for i in range(0, len(frames), n)])

    def _chunk(self, frames: np.ndarray, texts: Sequence[str], n: int) -> np.ndarray:
        b = len(frames)
        frames = np.concatenate([np.asarray(frames, np.float32), np.zeros((n - b, *frames.shape[1:]), np.float32)])
        texts = list(texts) + [""] * (n - b)
        src = self.encode(jnp.asarray(frames))
        feats, masks = self.encode_text([""] * n + texts)  # one call: one padded length, as the official batch
        neg, neg_mask, cap, mask = feats[:n], masks[:n], feats[n:], masks[n:]
        null = None
        if self.null_frame is not None:
            null = [self.encode(jnp.full_like(jnp.asarray(frames), 0.0 if self.null_frame == "grey" else -1.0))]
        key = jax.random.fold_in(jax.random.key(self.seed), self.calls)
        self.calls += 1
        noise = jax.random.normal(key, src.shape, jnp.float32)
        (lat,) = sample(self.generator, [noise], [src], cap, mask, neg, neg_mask, null_sources=null,
                        num_steps=self.num_steps, guidance_scale=self.guidance_scale,
                        image_guidance_scale=self.image_guidance_scale)
        return np.asarray(self.decode(lat))[:b]
