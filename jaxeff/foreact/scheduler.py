"""Flow-matching schedules of ForeAct's generator, as the diffusers schedulers it builds from SANA's scheduler config.

- Inference: `DPMSolverMultistepScheduler` with SANA's config (`Sana_1600M_512px_diffusers/scheduler`):
  DPM-Solver++ order 2, `solver_type="midpoint"`, `use_flow_sigmas`, `flow_shift=3.0`,
  `prediction_type="flow_prediction"`, `final_sigmas_type="zero"`, `lower_order_final` (first order at the first and
  the last step). `flow_sigmas` / `dpm_solver_step` reproduce its `set_timesteps` / `step` (tested against the golden
  trajectory and against diffusers itself).
- Training: `FlowMatchEulerDiscreteScheduler` built from the same config, which ignores `flow_shift` (it reads
  `shift`), so training is **unshifted**: sigmas linspace(1, 0.001, 1000), timesteps = 1000 * sigma
  (`train_schedule`; the official shift mismatch, see the package README).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
FLOW_SHIFT = 3.0


def flow_sigmas(num_steps: int, shift: float = FLOW_SHIFT,
                num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas float32 [num_steps + 1] ending in 0, timesteps int64 [num_steps]) of diffusers'
    `DPMSolverMultistepScheduler.set_timesteps` with `use_flow_sigmas`: alphas = linspace(1, 1/T, N+1) in float64,
    s = 1 - alphas, s' = shift*s / (1 + (shift-1)*s), reversed without its final 0; timesteps = int(s' * T).
    Raises ValueError for num_steps < 1 or shift <= 0."""
    if num_steps < 1 or shift <= 0:
        raise ValueError(f"need num_steps >= 1 and shift > 0, got {num_steps}, {shift}")
    s = 1.0 - np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)
    s = np.flip(shift * s / (1.0 + (shift - 1.0) * s))[:-1].copy()
    timesteps = (s * num_train_timesteps).astype(np.int64)
    return np.concatenate([s, [0.0]]).astype(np.float32), timesteps


def train_schedule(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                   shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas), both float32 [T], of `FlowMatchEulerDiscreteScheduler(shift=shift)`: timesteps
    T, T-1, ..., 1 and sigmas = timesteps / T, shifted as shift*s / (1 + (shift-1)*s). The official training uses
    shift 1 (see the module docstring)."""
    t = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
    s = t / num_train_timesteps
    s = (shift * s / (1 + (shift - 1) * s)).astype(np.float32)
    return (s * num_train_timesteps).astype(np.float32), s


def _lambda(sigma):
    return jnp.log(1.0 - sigma) - jnp.log(sigma)  # log alpha - log sigma, +inf at sigma = 0


def dpm_solver_step(x: jax.Array, v: jax.Array, x0_prev: jax.Array, i,
                    sigmas: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One Flow-DPM-Solver++(2M, midpoint) step of diffusers' `DPMSolverMultistepScheduler.step`.

    x: sample at sigmas[i]; v: the (guided) flow prediction; x0_prev: the previous step's data prediction (ignored
    at step 0); i: step index (traced is fine); sigmas: [N + 1] float32 ending in 0. Returns (x at sigmas[i+1], the
    data prediction x0 = x - sigma_i v). Steps 0 and N - 1 are first order (`lower_order_final`,
    `final_sigmas_type="zero"`; the last one returns x0 exactly). Computed in float32; the new sample is rounded to
    v's dtype, as diffusers casts `prev_sample` to the model output's dtype."""
    n = sigmas.shape[0] - 1
    x32, v32 = x.astype(jnp.float32), v.astype(jnp.float32)
    s_prev, s0, s_t = sigmas[jnp.maximum(i - 1, 0)], sigmas[i], sigmas[i + 1]
    x0 = x32 - s0 * v32
    alpha_t = 1.0 - s_t
    lam_t, lam_0, lam_1 = _lambda(s_t), _lambda(s0), _lambda(s_prev)
    h = lam_t - lam_0
    coef = alpha_t * (jnp.exp(-h) - 1.0)
    first = (s_t / s0) * x32 - coef * x0
    d1 = (1.0 / ((lam_0 - lam_1) / h)) * (x0 - x0_prev.astype(jnp.float32))
    second = first - 0.5 * coef * d1
    out = jnp.where((i == 0) | (i == n - 1), first, second)
    return out.astype(v.dtype).astype(jnp.float32), x0
