"""The flexible parallelized autoregressive decoder of LPD (mit-han-lab/lpd `models/lpd.py`, `block.py`, `mask.py`).

Sequence slots: slot 0 is the class slot (class embedding, or the learned `fake_latent` when the label is dropped),
slot 1 + k is the k-th token in generation order. Content tokens are `token_emb[x] + pos_embed[own position + 1]`;
position-query tokens are `mask_token + pos_embed[target position + 1]`; both go through one shared `z_proj_ln`.

Group-id attention rule (`models/mask.py`): cls has id 0, content of step j id 2j, queries of step j id 2j - 1;
position q sees key k iff id_q == id_k, or id_k < id_q and k is content. Queries of one step see each other
("mutual visibility") and earlier content; no token sees another step's queries.

Training uses a static layout of length 2N + 1 (cls, all N content tokens, N queries) so every schedule shares one
compile: the official sequence (length 2N + 1 - gK) is this one without the last step's content, which nothing
attends to (its id 2K exceeds every query id), so all official outputs are unchanged.

Shapes: tokens / orders [B, N] int32 (raster indices; orders[b, k] = raster index of the k-th generated token),
labels [B] int32, activations float32 unless `dtype` says otherwise; logits [B, N, V] in generation order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff import checks
from jaxeff.lpd import _checks
from jaxeff.lpd.config import LPDConfig
from jaxeff.nn.attention import xla_attention


def attend(q, k, v, mask, implementation: str | None = None):
    """Scaled dot-product attention over an explicit boolean mask [B or 1, Sq, Sk] (True = may attend).

    The shared front door (`jaxeff.nn.attention.attention`) describes masks by positions, which cannot express the
    group-id rule, so LPD calls its two mask-taking backends directly: "xla" (reference, CPU default) or
    "dot_product" (`jax.nn.dot_product_attention`, cuDNN on GPU; the default off CPU)."""
    if implementation is None:
        implementation = "xla" if jax.default_backend() == "cpu" else "dot_product"
    scale = q.shape[-1] ** -0.5
    if implementation == "xla":
        return xla_attention(q, k, v, jnp.broadcast_to(mask, (q.shape[0],) + mask.shape[1:]), scale)
    if implementation == "dot_product":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale)
    raise ValueError(f"unknown attention implementation {implementation!r}; choose None, 'xla' or 'dot_product'")


def _layer_norm(dim: int, cfg: LPDConfig, rngs, dtype, param_dtype):
    # Two-pass variance, as torch computes it (the fast E[x^2] - E[x]^2 form misses the 2e-5 parity).
    return nnx.LayerNorm(dim, epsilon=cfg.norm_eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)


def _linear(din: int, dout: int, rngs, dtype, param_dtype, use_bias: bool = True):
    return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=nnx.initializers.xavier_uniform(), dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)


class Attention(nnx.Module):
    """timm-style attention: fused qkv Linear (features split as (3, heads, head_dim)), output `proj`."""

    def __init__(self, cfg: LPDConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.num_heads = cfg.num_heads
        self.qkv = _linear(cfg.dim, 3 * cfg.dim, rngs, dtype, param_dtype)
        self.proj = _linear(cfg.dim, cfg.dim, rngs, dtype, param_dtype)
        self.proj_drop = nnx.Dropout(cfg.proj_dropout, rngs=rngs)

    def __call__(self, x, mask, cache=None, start=None, implementation=None, rngs=None):
        """x [B, S, D]; mask [B or 1, S, T]. Without `cache` T = S. With `cache` = (k, v) [B, T, H, hd], this
        call's k/v are written at slots start ... start + S - 1 first; returns (out, new cache or None).
        `rngs`: dropout randomness for this call (training); without it the module's own stream is used."""
        b, s, d = x.shape
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(b, s, 3, self.num_heads, d // self.num_heads), 2, 0)
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, start, 0, 0))
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, start, 0, 0))
            cache = (k, v)
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask, implementation).reshape(b, s, d)
        return self.proj_drop(self.proj(out), rngs=rngs), cache


class Mlp(nnx.Module):
    """timm `Mlp`: fc1, exact GELU, dropout, fc2, dropout."""

    def __init__(self, cfg: LPDConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.fc1 = _linear(cfg.dim, cfg.mlp_hidden, rngs, dtype, param_dtype)
        self.fc2 = _linear(cfg.mlp_hidden, cfg.dim, rngs, dtype, param_dtype)
        self.drop = nnx.Dropout(cfg.proj_dropout, rngs=rngs)

    def __call__(self, x, rngs=None):
        h = self.drop(jax.nn.gelu(self.fc1(x), approximate=False), rngs=rngs)
        return self.drop(self.fc2(h), rngs=rngs)


class Block(nnx.Module):
    """Pre-LN block: x + attn(norm1(x)), then x + mlp(norm2(x)); no layer scale, no drop path."""

    def __init__(self, cfg: LPDConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.norm1 = _layer_norm(cfg.dim, cfg, rngs, dtype, param_dtype)
        self.attn = Attention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm2 = _layer_norm(cfg.dim, cfg, rngs, dtype, param_dtype)
        self.mlp = Mlp(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, mask, cache=None, start=None, implementation=None, rngs=None):
        h, cache = self.attn(self.norm1(x), mask, cache, start, implementation, rngs)
        x = x + h
        return x + self.mlp(self.norm2(x), rngs), cache


def group_ids(step_of: jnp.ndarray) -> jnp.ndarray:
    """Group ids of the static training layout [cls, N content, N queries] -> [..., 2N + 1] int32.

    `step_of` [..., N]: the 1-based step that generates each generation index (`schedules.step_of`)."""
    step_of = jnp.asarray(step_of, jnp.int32)
    zero = jnp.zeros(step_of.shape[:-1] + (1,), jnp.int32)
    return jnp.concatenate([zero, 2 * step_of, 2 * step_of - 1], axis=-1)


def group_mask(ids: jnp.ndarray, is_content: jnp.ndarray, mutual_visibility: bool = True) -> jnp.ndarray:
    """The official rule: [..., L] ids, [L] or [..., L] content flags -> [..., L, L] bool (rows = queries).

    `mutual_visibility=False` is the ablation where a query sees no other query of its own step."""
    idq, idk = ids[..., :, None], ids[..., None, :]
    mask = (idq == idk) | ((idk < idq) & is_content[..., None, :])
    if not mutual_visibility:
        n = ids.shape[-1]
        is_query = ~is_content
        same = jnp.arange(n)[:, None] == jnp.arange(n)[None, :]
        mask &= ~(is_query[..., :, None] & is_query[..., None, :]) | same
    return mask


def training_mask(step_of: jnp.ndarray, mutual_visibility: bool = True) -> jnp.ndarray:
    """[..., 2N + 1, 2N + 1] mask of the static training layout."""
    n = step_of.shape[-1]
    is_content = jnp.arange(2 * n + 1) <= n
    return group_mask(group_ids(step_of), is_content, mutual_visibility)


def block_causal_mask(cumsum) -> jnp.ndarray:
    """[N + 1, N + 1] inference mask over slots (official `create_block_causal_mask` over blocks [1, g1, ..., gK]):
    a slot sees every slot up to the end of its own block. `cumsum` = `schedules.cumsum(group_sizes)`."""
    cumsum = jnp.asarray(cumsum, jnp.int32)
    slots = jnp.arange(cumsum[-1])
    block_end = cumsum[jnp.searchsorted(cumsum, slots, side="right")]
    return slots[None, :] < block_end[:, None]


class LPD(nnx.Module):
    """LPD decoder; parameter names follow the official state dict (see `jaxeff.lpd.weights`)."""

    def __init__(self, cfg: LPDConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = cfg
        d, n = cfg.dim, cfg.num_tokens
        init = nnx.initializers.normal(0.02)  # official initialize_weights
        self.class_emb = nnx.Embed(cfg.num_classes, d, embedding_init=init, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)
        self.token_emb = nnx.Embed(cfg.vocab_size, d, embedding_init=init, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)
        self.fake_latent = nnx.Param(init(rngs.params(), (1, d), param_dtype))
        self.pos_embed = nnx.Param(init(rngs.params(), (1, n + 1, d), param_dtype))
        self.z_proj_ln = _layer_norm(d, cfg, rngs, dtype, param_dtype)
        self.mask_token = nnx.Param(init(rngs.params(), (1, 1, d), param_dtype))
        self.blocks = nnx.List([Block(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype) for _ in range(cfg.depth)])
        self.norm = _layer_norm(d, cfg, rngs, dtype, param_dtype)
        self.head = _linear(d, cfg.vocab_size, rngs, dtype, param_dtype, use_bias=False)
        self.dtype = dtype

    # -- embeddings --------------------------------------------------------------------------------------------
    def class_vector(self, labels, batch: int, dropped=None):
        """[B, D]: class_emb[labels], or fake_latent where `dropped` (or for every sample when labels is None)."""
        fake = jnp.broadcast_to(self.fake_latent[...].astype(self.dtype), (batch, self.config.dim))
        if labels is None:
            return fake
        cls = self.class_emb(_checks.guard(labels, self.config.num_classes))
        return cls if dropped is None else jnp.where(jnp.asarray(dropped)[:, None], fake, cls)

    def content(self, token_vec, slot_pos):
        """Content tokens: embedding vectors [B, S, D] + their slots' position embeddings [B, S, D], then LN."""
        return self.z_proj_ln(token_vec + slot_pos)

    def query(self, slot_pos):
        """Position queries: mask_token + the target slot's position embedding [B, S, D], then LN."""
        return self.z_proj_ln(self.mask_token[...].astype(self.dtype) + slot_pos)

    def slot_positions(self, orders):
        """[B, N + 1, D] position embedding of every slot: row 0 for the class slot, 1 + orders[b, k] for slot 1 + k."""
        idx = jnp.concatenate([jnp.zeros_like(orders[:, :1]), orders + 1], axis=1)
        return jnp.take(self.pos_embed[...][0].astype(self.dtype), idx, axis=0)

    def run_blocks(self, x, mask, implementation=None, rngs=None):
        for block in self.blocks:
            x, _ = block(x, mask, implementation=implementation, rngs=rngs)
        return x

    # -- training forward --------------------------------------------------------------------------------------
    def training_sequence(self, tokens, labels, orders, dropped=None):
        """[B, 2N + 1, D] block-0 input of the static layout: [cls, N content, N queries] in generation order."""
        pos = self.slot_positions(orders)
        tok = jnp.take_along_axis(jnp.asarray(tokens, jnp.int32), orders, axis=1)
        tok = _checks.guard(tok, self.config.vocab_size)  # NaN, not a wrapped row, for ids out of range under jit
        cls = self.class_vector(labels, orders.shape[0], dropped)
        vec = jnp.concatenate([cls[:, None], self.token_emb(tok)], axis=1)
        return jnp.concatenate([self.content(vec, pos), self.query(pos[:, 1:])], axis=1)

    def __call__(self, tokens, labels, orders, step_of, dropped=None, *, mutual_visibility: bool = True,
                 return_hidden: bool = False, implementation=None, rngs: nnx.Rngs | None = None):
        """Teacher-forced logits [B, N, V] in generation order (logits[b, k] predicts tokens[b, orders[b, k]]).

        tokens [B, N] int in [0, vocab_size) (raster); labels [B] int in [0, num_classes) or None; orders [B, N]
        int, rows permutations of range(N); `step_of` [N] or [B, N]: the schedule as the step of each generation
        index (`schedules.step_of`: 1 first, non-decreasing by at most 1); `dropped` [B] bool: label replaced by
        `fake_latent` (see `drop_labels` for the training draw); `rngs`: dropout randomness when the model is in
        training mode (`model.train()`).

        Raises TypeError for non-integer tokens / labels / orders / step_of (a float image is not tokens),
        ValueError for other shapes and, for concrete arrays, for ids out of range, orders rows that are not
        permutations or a `step_of` that is no schedule. Under `jax.jit` (the training step) values cannot be
        inspected: a token or label outside its range then gives NaN logits (and a NaN loss)."""
        c = self.config
        n = c.num_tokens
        for name, x in (("tokens", tokens), ("orders", orders), ("step_of", step_of)) + \
                (() if labels is None else (("labels", labels),)):
            checks.require_int_array(x, name)
        b = np.shape(orders)[0] if np.ndim(orders) == 2 else None
        if np.shape(orders) != (b, n) or np.shape(tokens) != (b, n) or np.shape(step_of)[-1:] != (n,) or \
                (labels is not None and np.shape(labels) != (b,)):
            raise ValueError(f"need tokens and orders [B, N = {n}], step_of [N] or [B, N], labels [B]; got tokens "
                             f"{np.shape(tokens)}, orders {np.shape(orders)}, step_of {np.shape(step_of)}, "
                             f"labels {None if labels is None else np.shape(labels)}")
        _checks.check_range(tokens, c.vocab_size, "tokens")
        if labels is not None:
            _checks.check_range(labels, c.num_classes, "labels")
        _checks.check_permutations(orders, n)
        _check_step_of(step_of)
        orders = jnp.asarray(orders, jnp.int32)
        mask = training_mask(jnp.asarray(step_of, jnp.int32), mutual_visibility)
        mask = mask[None] if mask.ndim == 2 else mask
        x = self.training_sequence(tokens, labels, orders, dropped)
        x = self.norm(self.run_blocks(x, mask, implementation, rngs))
        hidden = x[:, n + 1:]
        logits = self.head(hidden)
        return (logits, hidden) if return_hidden else logits


def _check_step_of(step_of):
    """ValueError if a concrete `step_of` is not a schedule: 1 first, then non-decreasing by steps of 0 or 1."""
    s = checks.concrete(step_of)
    if s is None:
        return
    s = s.reshape(-1, s.shape[-1])
    if (s[:, 0] != 1).any() or (np.diff(s, axis=-1) < 0).any() or (np.diff(s, axis=-1) > 1).any():
        raise ValueError(f"step_of must be a schedule's step per generation index (schedules.step_of(group_sizes): "
                         f"starts at 1, rises by 0 or 1), got {s[0].tolist()}")


def drop_labels(key, batch: int, prob: float) -> jnp.ndarray:
    """[B] bool: which samples' labels are replaced by `fake_latent` (the official `torch.rand(B) < p`)."""
    return jax.random.uniform(key, (batch,)) < prob


def cross_entropy(logits, tokens, orders) -> jnp.ndarray:
    """Per-token cross-entropy [B, N] of generation-order logits against raster `tokens` (float32); a token
    outside [0, V) gives NaN (a negative one would otherwise wrap to another class)."""
    target = jnp.take_along_axis(jnp.asarray(tokens, jnp.int32), jnp.asarray(orders, jnp.int32), axis=1)
    target = _checks.guard(target, logits.shape[-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
