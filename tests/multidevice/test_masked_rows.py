"""Fully masked rows (issue 21, fault 3) and packed segments in sequence-parallel attention on 8 CPU devices.

Positions -1 are empty slots: their rows must come back as finite zeros, and their (possibly garbage) K/V must
never reach real rows, on every (ring, Ulysses) factorisation and through a 2-layer decoder.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.distributed import make_mesh
from jaxeff.longvila import sequence_parallel_attention, sp_attention_local, zigzag_permutation
from jaxeff.models.llama import Llama, LlamaConfig
from jaxeff.nn import attention

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/multidevice conftest)")

# The case: ring 4 x Ulysses 2, q/k/v [1, 16, 4, 8], positions 13-15 empty.
POSITIONS = np.where(np.arange(16) >= 13, -1, np.arange(16)).astype(np.int32)


def _qkv(seed=0, hkv=4):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (1, 16, 4, 8)), jax.random.normal(ks[1], (1, 16, hkv, 8)),
            jax.random.normal(ks[2], (1, 16, hkv, 8)))


# Ring only, Ulysses only (4 of the devices: 4 heads), 2D, and 2D with KV heads repeated over Ulysses.
@pytest.mark.parametrize("ring,uly,hkv", [(4, 2, 4), (8, 1, 4), (1, 4, 4), (2, 4, 2)])
def test_sp_attention_empty_slots_are_zero_and_do_not_leak(ring, uly, hkv):
    q, k, v = _qkv(hkv=hkv)
    mesh = make_mesh((ring, uly), ("ring", "ulysses"), devices=jax.devices()[:ring * uly])
    run = jax.jit(functools.partial(sequence_parallel_attention, mesh=mesh, ring_axis="ring", ulysses_axis="ulysses",
                                    positions=POSITIONS))
    out = run(q, k, v)
    ref = attention(q, k, v, q_positions=POSITIONS[None], kv_positions=POSITIONS[None], implementation="xla")
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_array_equal(out[:, 13:], 0.0)
    np.testing.assert_allclose(out, ref, atol=2e-6)
    # Garbage (NaN) in the empty slots' K/V changes nothing, and neither does the gradient.
    empty = jnp.asarray(POSITIONS < 0)[None, :, None, None]
    k_bad, v_bad = jnp.where(empty, jnp.nan, k), jnp.where(empty, jnp.nan, v)
    np.testing.assert_allclose(run(q, k_bad, v_bad), out, atol=1e-6)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(run(q, k, v) ** 2), argnums=(0, 1, 2)))(q, k_bad, v_bad)
    for g in grads:
        assert np.isfinite(np.asarray(g)[:, :13]).all()


def test_decoder_with_sp_attention_and_empty_slots_has_finite_logits():
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    graphdef, state = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
    mesh = make_mesh((4, 2), ("ring", "ulysses"))
    tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, cfg.vocab_size)
    positions = jnp.asarray(POSITIONS)[None]
    seq = jax.sharding.PartitionSpec(None, ("ring", "ulysses"))

    def sp_logits(state, tokens, positions):
        attn = functools.partial(sp_attention_local, ring_axis="ring", ulysses_axis="ulysses", ring_size=4,
                                 ulysses_size=2)
        fn = lambda i, q, k, v, *, q_positions, kv_positions: attn(q, k, v, q_positions, kv_positions)
        return nnx.merge(graphdef, state)(tokens, positions, attention_fn=fn)

    logits = jax.jit(jax.shard_map(sp_logits, mesh=mesh, in_specs=(jax.sharding.PartitionSpec(), seq, seq),
                                   out_specs=seq))(state, tokens, positions)
    ref = jax.jit(lambda s, t, p: nnx.merge(graphdef, s)(t, p, implementation="xla"))(state, tokens, positions)
    assert np.isfinite(np.asarray(logits)).all()
    np.testing.assert_allclose(logits[:, :13], ref[:, :13], atol=1e-5)
    # The real rows equal the model run on the real tokens alone.
    alone = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, implementation="xla"))(state, tokens[:, :13])
    np.testing.assert_allclose(logits[:, :13], alone, atol=1e-5)


@pytest.mark.parametrize("ring,uly", [(4, 2), (2, 4)])
def test_sp_attention_packed_segments(ring, uly):
    # Three packed sequences (11, 13, 8 tokens), positions restarting at 0, zigzag order, with gradients: each
    # equals its sequence attended alone.
    lengths = [11, 13, 8]
    seg = np.repeat(np.arange(3), lengths).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    perm = zigzag_permutation(32, ring, uly)
    ks = jax.random.split(jax.random.key(3), 4)
    q, w = (jax.random.normal(key, (1, 32, 8, 8)) for key in ks[:2])
    k, v = (jax.random.normal(key, (1, 32, 2, 8)) for key in ks[2:])
    mesh = make_mesh((ring, uly), ("ring", "ulysses"))

    def sp_loss(q, k, v):
        out = sequence_parallel_attention(q[:, perm], k[:, perm], v[:, perm], mesh=mesh, ring_axis="ring",
                                          ulysses_axis="ulysses", positions=pos[perm], segment_ids=seg[perm])
        return jnp.sum(out * w[:, perm]), out

    def ref_loss(q, k, v):
        bounds = np.cumsum([0] + lengths)
        out = jnp.concatenate([attention(q[:, a:b], k[:, a:b], v[:, a:b], implementation="xla")
                               for a, b in zip(bounds[:-1], bounds[1:])], axis=1)
        return jnp.sum(out * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(sp_loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    (_, ref), ref_grads = jax.value_and_grad(ref_loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(out, ref[:, perm], atol=2e-6)
    for g, gr in zip(grads, ref_grads):
        np.testing.assert_allclose(g, gr, atol=2e-5)
    with pytest.raises(ValueError, match="segment_ids must be"):
        sequence_parallel_attention(q, k, v, mesh=mesh, ring_axis="ring", ulysses_axis="ulysses",
                                    segment_ids=seg[:8])
