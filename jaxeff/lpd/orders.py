"""Generation orders: raster, uniformly random, and LPD's locality-aware order (mit-han-lab/lpd
`orders/lpd_order.py:9-125`).

An order is a permutation of the N = g*g raster indices (row * g + column): order[k] is the raster position of the
k-th generated token. The locality-aware order is built on the host in numpy, as officially (offline, pure Python):

1. step 0 picks one random cell (always a single cell, whatever g1 says);
2. at each later step every free cell (row-major) is scored by the sum of 1 / Euclidean distance over already
   selected cells within Chebyshev distance 1, added in selection order (float64); the list is shuffled once, then
   stably sorted by score, descending;
3. walking the cells with score >= tau (`proximity_threshold`), a cell is picked unless it lies within Chebyshev
   distance <= rho (`repulsion_threshold`) of a cell picked at this step;
4. the rest of the step comes from the pool [low-score cells, skipped cells, unexamined high-score cells] by
   farthest-point sampling from this step's picks (a random pool entry when there are none; the whole pool,
   without a draw, when it is no larger than what is still needed).

The randomness (the first cell, one shuffle per step, the FPS draws) goes through a `randomness` object, so the
official traces (`lpd_golden/orders/*.npz`, which record Python's and numpy's draws) can be replayed exactly.
Official settings: tau = 1; rho = 2 (256px, 20 and 32 steps), 3 (XXL 256px / 20), 4 (512px / 48).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.checks import require_int
from jaxeff.lpd import _checks, schedules

_INV_DIST = {(dr, dc): 1.0 / math.hypot(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc}


def raster_order(batch: int, num_tokens: int) -> jnp.ndarray:
    """[B, N] int32: 0 ... N - 1 for every sample. ValueError unless batch and N are ints >= 1."""
    require_int(batch, "batch", 1)
    require_int(num_tokens, "num_tokens", 1)
    return jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (batch, num_tokens))


def random_orders(key, batch: int, num_tokens: int) -> jnp.ndarray:
    """[B, N] int32: an independent uniformly random permutation per sample (training, `sample_orders`).
    `key`: one PRNG key (TypeError otherwise)."""
    _checks.check_key(key)
    require_int(batch, "batch", 1)
    require_int(num_tokens, "num_tokens", 1)
    return jax.vmap(lambda k: jax.random.permutation(k, num_tokens))(jax.random.split(key, batch)).astype(jnp.int32)


class NumpyRandomness:
    """Fresh randomness from a numpy Generator (the official code uses Python's `random` and numpy's global RNG;
    its streams are not reproduced)."""

    def __init__(self, rng: np.random.Generator | int | None = None):
        self.rng = np.random.default_rng(rng)

    def first_cell(self, num_cells: int) -> int:
        return int(self.rng.integers(num_cells))

    def shuffle(self, step: int, free: np.ndarray) -> np.ndarray:
        return self.rng.permutation(free)

    def randint(self, step: int, n: int) -> int:
        return int(self.rng.integers(n))


class TraceRandomness:
    """Replays a recorded official trace (`first_cell`, `free_shuffled` [K, N], `fps_random_draws` [K, 8])."""

    def __init__(self, trace):
        self.trace = trace
        self.draws: dict[int, list[int]] = {}

    def first_cell(self, num_cells: int) -> int:
        return int(self.trace["first_cell"])

    def shuffle(self, step: int, free: np.ndarray) -> np.ndarray:
        shuffled = np.asarray(self.trace["free_shuffled"][step][: len(free)], np.int64)
        if sorted(shuffled.tolist()) != sorted(free.tolist()):
            raise ValueError(f"trace step {step}: the recorded shuffle is not a permutation of the free cells")
        return shuffled

    def unused_draws(self) -> int:
        """Recorded FPS draws not consumed (0 after a faithful replay)."""
        used = {s: len(q) for s, q in self.draws.items()}
        return sum(used.get(s, int((row >= 0).sum())) for s, row in enumerate(self.trace["fps_random_draws"]))

    def randint(self, step: int, n: int) -> int:
        queue = self.draws.setdefault(step, [int(x) for x in self.trace["fps_random_draws"][step] if x >= 0])
        if not queue:
            raise ValueError(f"trace step {step}: more FPS draws needed than recorded")
        value = queue.pop(0)
        self.draws[step] = queue
        if not 0 <= value < n:
            raise ValueError(f"trace step {step}: recorded draw {value} outside [0, {n})")
        return value


def _rc(cells, grid: int) -> np.ndarray:
    cells = np.asarray(cells, np.int64)
    return np.stack([cells // grid, cells % grid], axis=-1).astype(np.float64)


def farthest_point_sampling(existing, pool, num_to_select: int, grid: int, randint=None) -> list[int]:
    """Pick `num_to_select` cells of `pool` one at a time, each maximising its minimum Euclidean distance to
    `existing` plus the cells picked so far (first pool index on ties; picked cells have distance 0). With an
    empty reference set the pick is `pool[randint(len(pool))]`. Cells are raster indices."""
    pool = list(pool)
    ref = list(existing)
    picked: list[int] = []
    pool_rc = _rc(pool, grid)
    for _ in range(num_to_select):
        if not ref:
            if randint is None:
                raise ValueError("farthest_point_sampling with no reference cells needs `randint`")
            cell = pool[randint(len(pool))]
        else:
            diff = pool_rc[:, None, :] - _rc(ref, grid)[None, :, :]
            cell = pool[int(np.argmax(np.sqrt((diff**2).sum(-1)).min(axis=1)))]
        picked.append(cell)
        ref.append(cell)
    return picked


def locality_aware_order(grid: int, group_sizes, proximity_threshold: float = 1.0, repulsion_threshold: float = 2.0,
                         randomness=None, *, return_proximity_counts: bool = False):
    """[N] int64 locality-aware order for a `grid` x `grid` token map and a schedule (sum = grid**2).

    `randomness`: `NumpyRandomness(seed)` (default: unseeded) or `TraceRandomness(npz)` to replay an official
    trace; `repulsion_threshold` is rho (Chebyshev), `proximity_threshold` tau. With `return_proximity_counts`
    also returns [K] int: how many of each step's cells (they come first) were proximity picks, not FPS."""
    require_int(grid, "grid", 1)
    n = grid * grid
    sizes = list(schedules.check_group_sizes(group_sizes, n))
    rnd = NumpyRandomness() if randomness is None else randomness
    selected = np.zeros(n, bool)
    score = np.zeros(n, np.float64)  # running sum, terms added in selection order (bit-exact with the official)
    order: list[int] = []
    counts = [0]

    def select(cell: int):
        selected[cell] = True
        order.append(cell)
        r, c = divmod(cell, grid)
        for (dr, dc), inv in _INV_DIST.items():
            rr, cc = r + dr, c + dc
            if 0 <= rr < grid and 0 <= cc < grid:
                score[rr * grid + cc] += inv

    select(rnd.first_cell(n))
    for step in range(1, len(sizes)):
        need = sizes[step]
        free = np.flatnonzero(~selected)
        shuffled = rnd.shuffle(step, free)
        ranked = sorted(shuffled.tolist(), key=lambda cell: -score[cell])  # stable
        high = [cell for cell in ranked if score[cell] >= proximity_threshold]
        low = [cell for cell in ranked if score[cell] < proximity_threshold]
        picks: list[int] = []
        skipped: list[int] = []
        examined = 0
        for cell in high:
            if len(picks) >= need:
                break
            examined += 1
            r, c = divmod(cell, grid)
            if any(max(abs(r - pr), abs(c - pc)) <= repulsion_threshold for pr, pc in (divmod(p, grid) for p in picks)):
                skipped.append(cell)
            else:
                picks.append(cell)
        counts.append(len(picks))
        if len(picks) < need:
            pool = low + skipped + high[examined:]
            rest = need - len(picks)
            picks += pool if len(pool) <= rest else farthest_point_sampling(
                picks, pool, rest, grid, functools.partial(rnd.randint, step))
        for cell in picks:
            select(cell)
    order = np.asarray(order, np.int64)
    return (order, np.asarray(counts)) if return_proximity_counts else order


def batched_orders(kind: str, batch: int, grid: int, group_sizes=None, *, seed: int = 0, **locality) -> np.ndarray:
    """[B, N] int32 orders of one `kind`: "raster", "random" or "locality" (numpy, for evaluation); N = grid**2.
    ValueError for an unknown kind, batch or grid < 1, or (locality) a schedule that does not sum to N."""
    require_int(batch, "batch", 1)
    require_int(grid, "grid", 1)
    n = grid * grid
    if kind == "raster":
        return np.asarray(raster_order(batch, n))
    if kind == "random":
        return np.asarray(random_orders(jax.random.key(seed), batch, n))
    if kind == "locality":
        if group_sizes is None:
            raise ValueError("the locality-aware order needs the group sizes")
        rnd = NumpyRandomness(seed)
        return np.stack([locality_aware_order(grid, group_sizes, randomness=rnd, **locality)
                         for _ in range(batch)]).astype(np.int32)
    raise ValueError(f"unknown order kind {kind!r}; choose raster, random or locality")
