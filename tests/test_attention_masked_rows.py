"""Fully masked rows on one device (issue 21, fault 3): every `jaxeff.nn.attention` implementation and the
ring kernel (`ring_attention_local`, one ring rank) return finite zeros for rows that see no key, and K/V at empty
slots (position -1), even NaN, never reach real rows, forward or backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxeff.longvila import ring_attention_local
from jaxeff.nn import attention, make_mask, xla_attention

POS = jnp.asarray(np.where(np.arange(16) >= 13, -1, np.arange(16)), jnp.int32)[None]  # slots 13-15 empty


def _qkv():
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (1, 16, 4, 8))
    k, v = (jax.random.normal(key, (1, 16, 2, 8)) for key in ks[1:])
    empty = (POS < 0)[:, :, None, None]
    return q, k, v, jnp.where(empty, jnp.nan, k), jnp.where(empty, jnp.nan, v)


IMPLS = {
    "xla": lambda q, k, v: attention(q, k, v, q_positions=POS, kv_positions=POS, implementation="xla"),
    "dot_product": lambda q, k, v: attention(q, k, v, q_positions=POS, kv_positions=POS,
                                             implementation="dot_product"),
    "ring": lambda q, k, v: ring_attention_local(q, k, v, POS, POS, ring_axis=None, ring_size=1),
}


@pytest.mark.parametrize("name", list(IMPLS))
def test_empty_slots_give_zeros_and_do_not_leak(name):
    fn = jax.jit(IMPLS[name])
    q, k, v, k_bad, v_bad = _qkv()
    out = fn(q, k, v)
    real = attention(q[:, :13], k[:, :13], v[:, :13], implementation="xla")  # the real tokens alone
    np.testing.assert_array_equal(out[:, 13:], 0.0)
    np.testing.assert_allclose(out[:, :13], real, atol=1e-5)
    np.testing.assert_allclose(fn(q, k_bad, v_bad), out, atol=1e-6)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2)))(q, k_bad, v_bad)
    for g in grads:
        assert np.isfinite(np.asarray(g)[:, :13]).all()


def test_query_that_sees_no_key_gets_zeros():
    # Every key lies in the future of every query: no empty slot, but no visible key either.
    q, k, v, _, _ = _qkv()
    qpos = jnp.zeros((1, 16), jnp.int32)
    kpos = jnp.arange(1, 17, dtype=jnp.int32)[None]
    for impl in ("xla", "dot_product"):
        out = attention(q, k, v, q_positions=qpos, kv_positions=kpos, implementation=impl)
        np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_xla_gradient_matches_finite_differences(softcap):
    # xla_attention's softmax carries its own derivative (custom_jvp): checked in both modes against finite
    # differences, with GQA (4 q / 2 KV heads), a ragged mask and rows that see no key (queries at empty slots).
    q, k, v, _, _ = _qkv()
    mask = make_mask(POS, POS)
    f = lambda q, k, v: xla_attention(q, k, v, mask, 0.7, softcap)
    check_grads(f, (q, k, v), order=1, modes=("fwd", "rev"), eps=1e-2, atol=2e-3, rtol=2e-3)
    gq = jax.grad(lambda q: jnp.sum(f(q, k, v) ** 2))(q)
    np.testing.assert_array_equal(gq[:, 13:], 0.0)  # a row with no visible key: output 0, gradient 0
