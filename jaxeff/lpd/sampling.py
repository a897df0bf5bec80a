"""K-step parallel decoding with a KV cache, as one compiled program (`lax.fori_loop`); official `sample_tokens`
(mit-han-lab/lpd `models/lpd.py:160-230`).

Cache slots: slot 0 is the class slot, slot 1 + k the k-th token in generation order (cs = [0, 1, 1 + g1, ...]).
Step i feeds the content of step i - 1 (the class vector at i = 0) at slots cs[i] ... cs[i+1] - 1, followed by
g_{i+1} position queries at cs[i+1] ... cs[i+2] - 1, as one contiguous block written into the cache before the
attention: so the queries' K/V written at step i - 1 are overwritten by the real content. Block-causal mask: a
content slot sees slots < cs[i+1], a query slot sees slots < cs[i+2] (its own step's queries included).

Static shapes: every step feeds a block of W = max content group + max query group slots (padding past the
real ones is written beyond everything visible and overwritten by the next step), and the cache holds N + 1 + W
slots, so one program serves all K steps. CFG (cfg != 1) doubles the batch, conditional half first; the unconditional
class vector is `fake_latent`; scale per token 1 + (cfg - 1) * k / N for generation index k (linear, the official
default) or cfg (constant). Sampling divides by max(temperature, 1e-5); `greedy` takes the argmax instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff import checks
from jaxeff.lpd import _checks, schedules
from jaxeff.lpd.model import LPD
from jaxeff.lpd.orders import batched_orders
from jaxeff.lpd.vq import VQModel, to_uint8

CFG_SCHEDULES = ("linear", "constant")


def cfg_scales(cfg: float, num_tokens: int, schedule: str = "linear") -> jnp.ndarray:
    """[N] float32 guidance scale per generation index (the official float32 computation)."""
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"unknown cfg schedule {schedule!r}; choose from {CFG_SCHEDULES}")
    if schedule == "constant":
        return jnp.full((num_tokens,), cfg, jnp.float32)
    idx = jnp.arange(num_tokens, dtype=jnp.float32)
    return (jnp.float32(cfg) - 1) * idx / num_tokens + 1


def _decode(model: LPD, orders, labels, key, cfg, temperature, *, sizes, guided, cfg_schedule, greedy,
            return_logits, implementation):
    c = model.config
    n, b, d = c.num_tokens, orders.shape[0], c.dim
    cs = jnp.asarray(schedules.cumsum(sizes))
    g_content, g_query = max((1,) + sizes[:-1]), max(sizes)
    width = g_content + g_query
    total = n + 1 + width
    bb = 2 * b if guided else b

    cls = model.class_vector(labels, b)
    if guided:
        cls = jnp.concatenate([cls, model.class_vector(None, b)], axis=0)
    pos = model.slot_positions(orders)
    pos = jnp.pad(pos, ((0, 0), (0, total - (n + 1)), (0, 0)))
    pos = jnp.concatenate([pos, pos], axis=0) if guided else pos
    scales = jnp.pad(cfg_scales(cfg, n, cfg_schedule), (0, g_query))

    cache_shape = (bb, total, c.num_heads, c.head_dim)
    caches = tuple((jnp.zeros(cache_shape, model.dtype), jnp.zeros(cache_shape, model.dtype)) for _ in model.blocks)
    gen = jnp.zeros((b, n + g_query), jnp.int32)
    logit_buf = jnp.zeros((3 if return_logits else 0, b, n + g_query, c.vocab_size), jnp.float32)
    j = jnp.arange(width)
    slots = jnp.arange(total)

    def step(i, carry):
        caches, gen, prev, logit_buf = carry
        start, g_prev = cs[i], cs[i + 1] - cs[i]
        is_content = j < g_prev
        tok = model.token_emb(prev[:, jnp.minimum(j, g_query - 1)])
        tok = jnp.concatenate([tok, tok], axis=0) if guided else tok
        vec = jnp.where(i == 0, cls[:, None], tok)
        p = jax.lax.dynamic_slice(pos, (0, start, 0), (bb, width, d))
        x = jnp.where(is_content[None, :, None], model.content(vec, p), model.query(p))
        limit = jnp.where(is_content, cs[i + 1], cs[i + 2])
        mask = (slots[None, :] < limit[:, None])[None]
        new_caches = []
        for block, cache in zip(model.blocks, caches):
            x, cache = block(x, mask, cache, start, implementation)
            new_caches.append(cache)
        h = jax.lax.dynamic_slice(model.norm(x), (0, g_prev, 0), (bb, g_query, d))
        logits = model.head(h).astype(jnp.float32)
        first = cs[i + 1] - 1  # generation index of this step's first token
        if guided:
            cond, uncond = logits[:b], logits[b:]
            s = jax.lax.dynamic_slice(scales, (first,), (g_query,))[None, :, None]
            out = uncond + s * (cond - uncond)
        else:
            cond = uncond = out = logits
        if greedy:
            chosen = jnp.argmax(out, axis=-1).astype(jnp.int32)
        else:
            chosen = jax.random.categorical(jax.random.fold_in(key, i), out / jnp.maximum(temperature, 1e-5))
            chosen = chosen.astype(jnp.int32)
        gen = jax.lax.dynamic_update_slice(gen, chosen, (0, first))
        if return_logits:
            logit_buf = jax.lax.dynamic_update_slice(logit_buf, jnp.stack([cond, uncond, out]), (0, 0, first, 0))
        return tuple(new_caches), gen, chosen, logit_buf

    prev = jnp.zeros((b, g_query), jnp.int32)
    _, gen, _, logit_buf = jax.lax.fori_loop(0, len(sizes), step, (caches, gen, prev, logit_buf))
    gen = gen[:, :n]
    tokens = jnp.zeros_like(gen).at[jnp.arange(b)[:, None], orders].set(gen)
    result = {"tokens": tokens, "tokens_gen_order": gen}
    if return_logits:
        result.update(cond_logits=logit_buf[0, :, :n], uncond_logits=logit_buf[1, :, :n],
                      guided_logits=logit_buf[2, :, :n])
    return result


@functools.partial(jax.jit, static_argnames=("graphdef", "sizes", "guided", "cfg_schedule", "greedy",
                                             "return_logits", "implementation", "has_labels"))
def _decode_jit(graphdef, state, orders, labels, key, cfg, temperature, *, has_labels, **static):
    model = nnx.merge(graphdef, state)
    model.eval()  # dropout off (the merged copy only)
    return _decode(model, orders, labels if has_labels else None, key, cfg, temperature, **static)


def generate(model: LPD, group_sizes, orders, labels=None, *, cfg: float = 1.0, cfg_schedule: str = "linear",
             temperature: float = 1.0, key=None, greedy: bool = False, return_logits: bool = False,
             implementation: str | None = None) -> dict:
    """Generate tokens in K = len(group_sizes) forward passes (one jit-compiled program per schedule).

    group_sizes: tokens per step, positive ints summing to N (e.g. `schedules.group_sizes(256, 20)`); orders
    [B, N] int (raster indices in generation order, each row a permutation of range(N); e.g.
    `orders.locality_aware_order`); labels [B] int in [0, num_classes) or None (unconditional: `fake_latent`);
    key: one PRNG key (`jax.random.key(seed)`), needed unless `greedy`; temperature >= 0. Returns
    {"tokens" [B, N] raster, "tokens_gen_order" [B, N]} plus, with `return_logits`, float32 [B, N, V]
    "cond_logits", "uncond_logits", "guided_logits" in generation order.

    Raises TypeError for non-integer orders / labels or a key that is not one PRNG key, ValueError for a bad
    schedule, shapes, labels out of range, or an orders row that is not a permutation (the row is named). The
    value checks run on the host; `generate` is not meant to be traced (it compiles its own program)."""
    c = model.config
    sizes = schedules.check_group_sizes(group_sizes, c.num_tokens)
    checks.require_int_array(orders, "orders")
    if np.ndim(orders) != 2 or np.shape(orders)[1] != c.num_tokens:
        raise ValueError(f"orders must be [B, {c.num_tokens}], got {np.shape(orders)}")
    _checks.check_permutations(orders, c.num_tokens)
    orders = jnp.asarray(orders, jnp.int32)
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"unknown cfg schedule {cfg_schedule!r}; choose from {CFG_SCHEDULES}")
    if labels is not None:
        checks.require_int_array(labels, "labels")
        if np.shape(labels) != (orders.shape[0],):
            raise ValueError(f"labels must be [B] = [{orders.shape[0]}] class ids (one per orders row), got shape "
                             f"{np.shape(labels)}")
        _checks.check_range(labels, c.num_classes, "labels")
    if not greedy and key is None:
        raise ValueError("sampling needs a PRNG key (or greedy=True)")
    if key is not None:
        _checks.check_key(key)
    cfg = checks.require_number(cfg, "cfg")
    temperature = checks.require_number(temperature, "temperature", 0.0)
    graphdef, state = nnx.split(model)
    return _decode_jit(
        graphdef, state, orders, jnp.zeros(orders.shape[:1], jnp.int32) if labels is None else jnp.asarray(labels),
        jax.random.key(0) if key is None else key, jnp.float32(cfg), jnp.float32(temperature),
        has_labels=labels is not None, sizes=sizes, guided=float(cfg) != 1.0, cfg_schedule=cfg_schedule,
        greedy=greedy, return_logits=return_logits, implementation=implementation)


@functools.partial(jax.jit, static_argnames="graphdef")
def _vq_images_jit(graphdef, state, tokens):
    return to_uint8(nnx.merge(graphdef, state).decode_code(tokens))


def generate_images(model: LPD, vq: VQModel, labels, *, steps: int = 20, cfg: float = 1.0, key=None, orders=None,
                    seed: int = 0, temperature: float = 1.0, proximity_threshold: float = 1.0,
                    repulsion_threshold: float = 2.0) -> dict:
    """Class-conditional images end to end, as the official evaluation: the official group-size table for the
    image size (`vq.config.factor * grid_size` px, 256 or 512) at `steps` steps, locality-aware orders (tau, rho;
    built on the host from `seed`), `generate` (temperature, linear CFG ramp), then the VQ decode (jit-compiled)
    to uint8.

    labels [B] int in [0, num_classes). `orders` [B, N]: pass the returned orders back to skip building them
    (officially they are precomputed offline; time the device part that way). `key` defaults to
    `jax.random.key(seed)`. Raises ValueError for labels that are not [B] class ids, a `steps` without an official
    table for the image size (naming those that exist), or an LPD vocabulary other than the VQ codebook; and
    what `generate` raises.
    Returns {"images": uint8 [B, H, W, 3], "tokens": int32 [B, N] raster, "orders": int32 [B, N] numpy}."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D list of class ids [B] (one per image), got shape {labels.shape}")
    checks.require_int_array(labels, "labels")
    _checks.check_range(labels, model.config.num_classes, "labels")
    if model.config.vocab_size != vq.config.codebook_size:
        raise ValueError(f"the LPD vocabulary ({model.config.vocab_size}) must be the VQ codebook "
                         f"({vq.config.codebook_size}): its tokens are the VQ's code ids")
    grid = model.config.grid_size
    sizes = schedules.group_sizes(vq.config.factor * grid, steps)
    if orders is None:
        orders = batched_orders("locality", len(labels), grid, sizes, seed=seed,
                                proximity_threshold=proximity_threshold, repulsion_threshold=repulsion_threshold)
    out = generate(model, sizes, orders, labels, cfg=cfg, temperature=temperature,
                   key=jax.random.key(seed) if key is None else key)
    graphdef, state = nnx.split(vq)
    images = _vq_images_jit(graphdef, state, out["tokens"].reshape(len(labels), grid, grid))
    return {"images": images, "tokens": out["tokens"], "orders": np.asarray(orders)}
