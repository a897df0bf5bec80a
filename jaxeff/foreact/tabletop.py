"""A small rendered tabletop world for ForeAct's mechanism at toy scale (experiments/foreact_tabletop.py).

An 8x8 grid drawn at 4 pixels per cell (32x32 RGB, floats in [-1, 1]): a table, three coloured target pads, three
blocks of the same colours and a gripper. Actions: 0 up, 1 down, 2 left, 3 right, 4 grasp (the top block of the
gripper's cell), 5 release (onto the top of that cell's stack). Drawing: the top block of a stack fills the cell's
centre 2x2, the block under it the bottom row, a third one the top row; the gripper is two dark "fingers" (left and
right columns of the cell's middle rows), with the held block in its centre.

Tasks (instruction -> subtasks, each with an oracle completion check):
- sort (order a, b, c): "put the a block on the a pad", then b, then c;
- stack (a, b, c): "put the a block on the a pad", "put the b block on the a block", "put the c block on the b
  block".
`expert_action` is a scripted expert (walk to the block row-first, grasp, walk to the target, release).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

GRID, CELL = 8, 4
SIZE = GRID * CELL
COLOURS = ("red", "green", "blue")
_BLOCK_RGB = np.array([[220, 40, 40], [40, 170, 60], [50, 80, 220]], np.float32)
_PAD_RGB = np.array([[250, 180, 180], [180, 240, 180], [180, 200, 250]], np.float32)
_TABLE_RGB = np.array([200, 190, 170], np.float32)
_GRIPPER_RGB = np.array([30, 30, 30], np.float32)
ACTIONS = ("up", "down", "left", "right", "grasp", "release")
_MOVES = {0: (-1, 0), 1: (1, 0), 2: (0, -1), 3: (0, 1)}
ORDERS = tuple(itertools.permutations(range(3)))
TASKS = tuple((kind, order) for kind in ("sort", "stack") for order in ORDERS)  # task id = index
SUBTASKS = tuple([f"put the {c} block on the {c} pad" for c in COLOURS]
                 + [f"put the {a} block on the {b} block" for a in COLOURS for b in COLOURS if a != b])
WORDS = ("<s>", "put", "the", "block", "on", "pad", *COLOURS)


def instruction(task_id: int) -> str:
    kind, order = TASKS[task_id]
    names = [COLOURS[i] for i in order]
    if kind == "sort":
        return f"sort the blocks onto their pads: {', '.join(names)}"
    return f"stack {names[2]} on {names[1]} on {names[0]} on the {names[0]} pad"


def subtasks(task_id: int) -> list[str]:
    kind, (a, b, c) = TASKS[task_id]
    if kind == "sort":
        return [SUBTASKS[i] for i in (a, b, c)]
    on = lambda x, y: f"put the {COLOURS[x]} block on the {COLOURS[y]} block"
    return [SUBTASKS[a], on(b, a), on(c, b)]


def parse_subtask(text: str) -> tuple[int, str, int]:
    """"put the X block on the Y pad|block" -> (block X, "pad" | "block", Y); ValueError otherwise."""
    words = text.split()
    if len(words) != 8 or words[2] not in COLOURS or words[6] not in COLOURS or words[7] not in ("pad", "block"):
        raise ValueError(f"not a tabletop subtask: {text!r}")
    return COLOURS.index(words[2]), words[7], COLOURS.index(words[6])


@dataclasses.dataclass
class Tabletop:
    """One environment. `reset(rng, task_id)`, `render()`, `step(action)`, `done(subtask)`, `success()`."""

    gripper: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(2, np.int64))
    pads: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((3, 2), np.int64))
    stacks: dict = dataclasses.field(default_factory=dict)  # (row, col) -> [block ids, bottom first]
    held: int = -1
    task_id: int = 0

    def reset(self, rng: np.random.Generator, task_id: int) -> Tabletop:
        cells = rng.choice(GRID * GRID, 7, replace=False)
        rc = np.stack([cells // GRID, cells % GRID], 1)
        self.pads, self.gripper = rc[:3].copy(), rc[6].copy()
        self.stacks = {tuple(rc[3 + i]): [i] for i in range(3)}
        self.held, self.task_id = -1, task_id
        return self

    def copy(self) -> Tabletop:
        return Tabletop(self.gripper.copy(), self.pads.copy(), {k: list(v) for k, v in self.stacks.items()},
                        self.held, self.task_id)

    def where(self, block: int) -> tuple[tuple[int, int], int] | None:
        """(cell, level) of a block on the table, None while held."""
        for cell, stack in self.stacks.items():
            if block in stack:
                return cell, stack.index(block)
        return None

    def step(self, action: int) -> None:
        cell = tuple(self.gripper)
        if action in _MOVES:
            self.gripper = np.clip(self.gripper + _MOVES[action], 0, GRID - 1)
        elif action == 4 and self.held < 0 and self.stacks.get(cell):
            self.held = self.stacks[cell].pop()
            if not self.stacks[cell]:
                del self.stacks[cell]
        elif action == 5 and self.held >= 0:
            self.stacks.setdefault(cell, []).append(self.held)
            self.held = -1
        elif action not in range(len(ACTIONS)):
            raise ValueError(f"action must be in 0..{len(ACTIONS) - 1}, got {action}")

    def target(self, subtask: str) -> tuple[tuple[int, int], int]:
        """(cell, level) where the subtask's block must end up."""
        block, kind, other = parse_subtask(subtask)
        if kind == "pad":
            return tuple(self.pads[other]), 0
        place = self.where(other)
        return (None, -1) if place is None else (place[0], place[1] + 1)

    def done(self, subtask: str) -> bool:
        block = parse_subtask(subtask)[0]
        place = self.where(block)
        return place is not None and place == self.target(subtask)

    def success(self) -> bool:
        return all(self.done(s) for s in subtasks(self.task_id))

    def render(self) -> np.ndarray:
        img = np.broadcast_to(_TABLE_RGB, (SIZE, SIZE, 3)).copy()
        for i, (r, c) in enumerate(self.pads):
            img[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = _PAD_RGB[i]
        for (r, c), stack in self.stacks.items():
            y, x = r * CELL, c * CELL
            if len(stack) >= 2:
                img[y + CELL - 1, x : x + CELL] = _BLOCK_RGB[stack[-2]]
            if len(stack) >= 3:
                img[y, x : x + CELL] = _BLOCK_RGB[stack[-3]]
            img[y + 1 : y + 3, x + 1 : x + 3] = _BLOCK_RGB[stack[-1]]
        y, x = self.gripper * CELL
        img[y + 1 : y + 3, x] = img[y + 1 : y + 3, x + CELL - 1] = _GRIPPER_RGB
        if self.held >= 0:
            img[y + 1 : y + 3, x + 1 : x + 3] = _BLOCK_RGB[self.held]
        return img / 127.5 - 1.0


def expert_action(env: Tabletop, subtask: str) -> int:
    """The scripted expert's next action for `subtask` (row first, then column)."""
    block = parse_subtask(subtask)[0]
    if env.held >= 0 and env.held != block:
        return 5
    if env.held == block:
        goal, _ = env.target(subtask)
    else:
        goal, _ = env.where(block)
        if env.stacks[goal][-1] != block:
            raise ValueError(f"block {COLOURS[block]} is covered: {subtask!r} cannot be done")
    dr, dc = goal[0] - env.gripper[0], goal[1] - env.gripper[1]
    if dr:
        return 0 if dr < 0 else 1
    if dc:
        return 2 if dc < 0 else 3
    return 4 if env.held < 0 else 5


def rollout_subtask(env: Tabletop, subtask: str, max_steps: int = 64, *, noise: float = 0.0,
                    rng: np.random.Generator | None = None) -> tuple[list[np.ndarray], list[int]]:
    """Run the expert on `env` (in place) until `subtask` is done: (frames before each action, the expert's actions);
    the end frame is `env.render()` afterwards. With `noise` > 0 a random move replaces the executed action with
    that probability while the expert's action stays the label (DART-style noise injection: demos that show how to
    recover). Raises RuntimeError if the subtask is not done within max_steps."""
    frames, actions = [], []
    while not env.done(subtask):
        if len(actions) >= max_steps:
            raise RuntimeError(f"expert did not finish {subtask!r} in {max_steps} steps")
        frames.append(env.render())
        actions.append(expert_action(env, subtask))
        perturb = noise > 0 and rng is not None and rng.random() < noise
        env.step(int(rng.integers(4)) if perturb else actions[-1])
    return frames, actions


def encode_words(texts: list[str], length: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Word ids [B, length] (left-padded with 0, always starting with "<s>", as the official prompts keep their
    system prompt when the caption is empty) and mask [B, length]."""
    ids = np.zeros((len(texts), length), np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for i, text in enumerate(texts):
        words = ["<s>", *text.split()]
        if len(words) > length or any(w not in WORDS for w in words):
            raise ValueError(f"caption {text!r} does not fit the toy vocabulary / {length} words")
        ids[i, length - len(words):] = [WORDS.index(w) for w in words]
        mask[i, length - len(words):] = 1
    return ids, mask
