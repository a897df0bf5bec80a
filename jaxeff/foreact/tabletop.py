"""A small rendered tabletop world for ForeAct's mechanism at toy scale (experiments/foreact_tabletop.py).

An 8x8 grid drawn at 4 pixels per cell (32x32 RGB, floats in [-1, 1]): a table, three coloured target pads, three
blocks of the same colours and a gripper. Drawing: the top block of a stack fills the cell's centre 2x2, the block
under it the bottom row, a third one the top row; the gripper is two dark "fingers" (left and right columns of the
cell's middle rows).

Action space: one action is a whole pick-and-place primitive `(pick, place)`, two cell indices `row * GRID + col`.
The gripper goes to `pick`, grasps the top block there (if any), goes to `place` and releases it on top of that
cell's stack; it rests at `place` afterwards. An empty `pick` cell only moves the gripper. One correct action
completes one subtask, so a policy's errors cannot compound over dozens of low-level steps.

Tasks (instruction -> subtasks, each with an oracle completion check):
- sort (order a, b, c): "put the a block on the a pad", then b, then c;
- stack (a, b, c): "put the a block on the a pad", "put the b block on the a block", "put the c block on the b
  block".
`expert_action` is the scripted expert: the block's cell and the target cell.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

GRID, CELL = 8, 4
SIZE = GRID * CELL
CELLS = GRID * GRID
COLOURS = ("red", "green", "blue")
BLOCK_RGB = np.array([[220, 40, 40], [40, 170, 60], [50, 80, 220]], np.float32)
PAD_RGB = np.array([[250, 180, 180], [180, 240, 180], [180, 200, 250]], np.float32)
_TABLE_RGB = np.array([200, 190, 170], np.float32)
_GRIPPER_RGB = np.array([30, 30, 30], np.float32)
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
    """One environment. `reset(rng, task_id)`, `render()`, `step(pick, place)`, `done(subtask)`, `success()`."""

    gripper: int = 0  # cell index
    pads: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3, np.int64))  # cell index per colour
    stacks: dict = dataclasses.field(default_factory=dict)  # cell -> [block ids, bottom first]
    task_id: int = 0

    def reset(self, rng: np.random.Generator, task_id: int) -> Tabletop:
        """Pads, blocks and gripper on 7 distinct random cells."""
        cells = rng.choice(CELLS, 7, replace=False)
        self.pads, self.gripper = cells[:3].astype(np.int64), int(cells[6])
        self.stacks = {int(cells[3 + i]): [i] for i in range(3)}
        self.task_id = task_id
        return self

    def copy(self) -> Tabletop:
        return Tabletop(self.gripper, self.pads.copy(), {k: list(v) for k, v in self.stacks.items()}, self.task_id)

    def where(self, block: int) -> tuple[int, int]:
        """(cell, level) of a block."""
        for cell, stack in self.stacks.items():
            if block in stack:
                return cell, stack.index(block)
        raise AssertionError(f"block {block} is nowhere")

    def step(self, pick: int, place: int) -> None:
        """One pick-and-place primitive; ValueError for a cell outside 0..CELLS-1."""
        for name, cell in (("pick", pick), ("place", place)):
            if not 0 <= int(cell) < CELLS:
                raise ValueError(f"{name} cell must be in 0..{CELLS - 1}, got {cell}")
        pick, place = int(pick), int(place)
        if self.stacks.get(pick):
            block = self.stacks[pick].pop()
            if not self.stacks[pick]:
                del self.stacks[pick]
            self.stacks.setdefault(place, []).append(block)
        self.gripper = place

    def target(self, subtask: str) -> tuple[int, int]:
        """(cell, level) where the subtask's block must end up."""
        block, kind, other = parse_subtask(subtask)
        if kind == "pad":
            return int(self.pads[other]), 0
        if other == block:
            raise ValueError(f"a block cannot go on itself: {subtask!r}")
        cell, level = self.where(other)
        return cell, level + 1

    def done(self, subtask: str) -> bool:
        return self.where(parse_subtask(subtask)[0]) == self.target(subtask)

    def success(self) -> bool:
        return all(self.done(s) for s in subtasks(self.task_id))

    def render(self) -> np.ndarray:
        """[SIZE, SIZE, 3] float32 in [-1, 1]."""
        img = np.broadcast_to(_TABLE_RGB, (SIZE, SIZE, 3)).copy()
        for i, cell in enumerate(self.pads):
            r, c = divmod(int(cell), GRID)
            img[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = PAD_RGB[i]
        for cell, stack in self.stacks.items():
            r, c = divmod(cell, GRID)
            y, x = r * CELL, c * CELL
            if len(stack) >= 2:
                img[y + CELL - 1, x : x + CELL] = BLOCK_RGB[stack[-2]]
            if len(stack) >= 3:
                img[y, x : x + CELL] = BLOCK_RGB[stack[-3]]
            img[y + 1 : y + 3, x + 1 : x + 3] = BLOCK_RGB[stack[-1]]
        r, c = divmod(self.gripper, GRID)
        y, x = r * CELL, c * CELL
        img[y + 1 : y + 3, x] = img[y + 1 : y + 3, x + CELL - 1] = _GRIPPER_RGB
        return (img / 127.5 - 1.0).astype(np.float32)


def expert_action(env: Tabletop, subtask: str) -> tuple[int, int]:
    """The scripted expert's primitive for `subtask`: (the block's cell, the target cell). ValueError when the block
    is covered by another one (the subtask cannot be done in one primitive)."""
    block = parse_subtask(subtask)[0]
    cell, _ = env.where(block)
    if env.stacks[cell][-1] != block:
        raise ValueError(f"block {COLOURS[block]} is covered: {subtask!r} cannot be done")
    return cell, env.target(subtask)[0]


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
