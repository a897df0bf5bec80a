"""LongVILA MM-SP exactness on 8 CPU devices: 2D attention and the whole video VLM equal the unsplit model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.distributed import make_mesh
from jaxeff.longvila import causal_work, padded_length, sequence_parallel_attention, zigzag_permutation
from jaxeff.longvila.layout import length_multiple
from jaxeff.longvila.measure import sp_mesh
from jaxeff.longvila.vlm import MMSPConfig, VideoVLM, make_mmsp_loss, random_batch, tiny_config, unsplit_loss
from jaxeff.models.vit import ViT, ViTConfig, space_to_channel, temporal_pool
from jaxeff.nn import attention

FACTORISATIONS = [(8, 1), (4, 2), (2, 4), (1, 8)]

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices: run tests/multidevice in its own "
                                "process (its conftest sets XLA_FLAGS before jax is imported)")


def _mesh(ring, uly):
    return sp_mesh(ring, uly)


@pytest.mark.parametrize("ring,uly", [(r, u) for r in range(1, 9) for u in range(1, 9) if r * u <= 32])
def test_zigzag_partition_is_valid_and_balanced(ring, uly):
    s = padded_length(37, ring, uly)
    assert s % length_multiple(ring, uly) == 0 and s >= 37
    perm = zigzag_permutation(s, ring, uly)
    assert sorted(perm.tolist()) == list(range(s))  # a permutation: every token in exactly one slot
    slots = perm.reshape(ring * uly, -1)  # ring-major slots, equal sizes
    assert slots.shape[1] * ring * uly == s
    work = causal_work(perm, ring, uly)
    # Every device does the same ideal causal work; contiguous sharding does not once there is a ring.
    assert np.ptp(work["pairs"]) == 0
    if ring > 1:
        contiguous = causal_work(np.arange(s), ring, uly)
        assert np.ptp(contiguous["pairs"]) > 0
        assert work["critical_path"][0] < contiguous["critical_path"][0]


def test_padding_multiple_and_bad_input():
    assert length_multiple(2, 3) == 12 and length_multiple(4, 2) == 8 and length_multiple(1, 8) == 8
    with pytest.raises(ValueError, match="divisible"):
        zigzag_permutation(20, 2, 4)
    mesh = _mesh(2, 4)
    q = jnp.zeros((1, 12, 8, 4))
    with pytest.raises(ValueError, match="divisible by ring x ulysses"):
        sequence_parallel_attention(q, q, q, mesh=mesh, ring_axis="ring", ulysses_axis="ulysses")
    q = jnp.zeros((1, 16, 6, 4))
    with pytest.raises(ValueError, match="Ulysses degree"):
        sequence_parallel_attention(q, q, q, mesh=mesh, ring_axis="ring", ulysses_axis="ulysses")


def test_mesh_axis_names_are_checked_by_name():
    q = jnp.zeros((1, 16, 8, 4))
    other = make_mesh((2, 4), ("data", "model"))
    with pytest.raises(ValueError, match=r"ring_axis='ring' is not an axis of the mesh; its axes are \('data', 'mo"):
        sequence_parallel_attention(q, q, q, mesh=other, ring_axis="ring", ulysses_axis="ulysses")
    with pytest.raises(ValueError, match=r"ulysses_axis='heads' is not an axis .* \('ring', 'ulysses'\)"):
        sequence_parallel_attention(q, q, q, mesh=_mesh(2, 4), ring_axis="ring", ulysses_axis="heads")
    with pytest.raises(ValueError, match="two different mesh axes, both are 'ring'"):
        sequence_parallel_attention(q, q, q, mesh=_mesh(2, 4), ring_axis="ring", ulysses_axis="ring")
    with pytest.raises(ValueError, match=r"ring_axis='sp' is not an axis .* \('data', 'model'\)"):
        make_mmsp_loss(None, other, MMSPConfig(ring_axis="sp", ulysses_axis="model"))


def _attn_inputs(b=2, s=32, h=8, hkv=2, d=8):
    ks = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(ks[0], (b, s, h, d))
    k = jax.random.normal(ks[1], (b, s, hkv, d))
    v = jax.random.normal(ks[2], (b, s, hkv, d))
    w = jax.random.normal(ks[3], (b, s, h, d))
    return q, k, v, w


@pytest.mark.parametrize("ring,uly,causal,zigzag", [(r, u, True, True) for r, u in FACTORISATIONS]
                         + [(2, 4, False, False)])
def test_attention_matches_single_device(ring, uly, causal, zigzag):
    # 2 KV heads < Ulysses degree 4 / 8 exercises the KV repeat and its summed gradients.
    q, k, v, w = _attn_inputs()
    s = q.shape[1]
    perm = zigzag_permutation(s, ring, uly) if zigzag else np.arange(s)
    mesh = _mesh(ring, uly)

    def sp_loss(q, k, v):
        out = sequence_parallel_attention(q[:, perm], k[:, perm], v[:, perm], mesh=mesh, ring_axis="ring",
                                          ulysses_axis="ulysses", causal=causal, positions=perm)
        return jnp.sum(out * w[:, perm]), out

    def ref_loss(q, k, v):
        out = attention(q, k, v, causal=causal, implementation="xla")
        return jnp.sum(out * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(sp_loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    (_, ref), ref_grads = jax.value_and_grad(ref_loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(out, ref[:, perm], atol=2e-6)
    for g, gr in zip(grads, ref_grads):
        assert g.shape == gr.shape
        np.testing.assert_allclose(g, gr, atol=2e-5)


@pytest.fixture(scope="module")
def vlm_case():
    # 8 query / 2 KV heads: KV heads < Ulysses degree for (2, 4) and (1, 8). One decoder layer keeps compiles short
    # (the experiment longvila_mmsp checks the 2-layer model).
    cfg = tiny_config(layers=1)
    graphdef, state = nnx.split(VideoVLM(cfg, rngs=nnx.Rngs(0)))
    # 14 frames over 8 devices; 7 and 4 frames with pool 2 (a half-empty last group); 21 and 9 tokens.
    batch = random_batch(cfg, num_frames=[7, 4], text_len=[5, 1], max_text=5)
    unsplit = lambda state: unsplit_loss(nnx.merge(graphdef, state), batch)
    (loss, stats), grads = jax.jit(jax.value_and_grad(unsplit, has_aux=True))(state)
    return graphdef, state, batch, float(loss), float(stats["count"]), grads


@pytest.mark.parametrize("ring,uly", FACTORISATIONS)
def test_mmsp_model_loss_and_grads_match_unsplit(vlm_case, ring, uly):
    graphdef, state, batch, ref_loss, ref_count, ref_grads = vlm_case
    loss_fn = make_mmsp_loss(graphdef, _mesh(ring, uly), MMSPConfig())
    (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state, batch)
    assert float(stats["count"]) == ref_count
    assert abs(float(loss) / ref_loss - 1) < 1e-6
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads, ref_grads))
    assert max(diffs) < 1e-4
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads)) > 1e-3  # gradients are not ~0


def test_vision_connector_pieces():
    # space_to_channel: each 2x2 square of a 4x4 grid becomes one token, (row, col, channel) ordered.
    grid = jnp.arange(16.0).reshape(1, 16, 1)
    merged = space_to_channel(grid, 4, 2)
    np.testing.assert_array_equal(merged[0, 0], [0, 1, 4, 5])
    np.testing.assert_array_equal(merged[0, 3], [10, 11, 14, 15])
    assert space_to_channel(jnp.zeros((2, 9, 3)), 3, 2).shape == (2, 4, 12)  # zero-padded 3x3 -> 4x4
    # temporal_pool: mean over the real frames of each group only.
    x = jnp.arange(5.0)[None, :, None, None] * jnp.ones((1, 5, 2, 3))
    pooled, mask = temporal_pool(x, jnp.array([[True, True, True, False, False]]), 2)
    np.testing.assert_allclose(pooled[0, :, 0, 0], [0.5, 2.0, 0.0])
    np.testing.assert_array_equal(mask[0], [True, True, False])
    # ViT: select_layer=-1 is the last layer before post_layernorm.
    vit = ViT(ViTConfig(image_size=8, patch_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2), rngs=nnx.Rngs(0))
    pixels = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
    last, before_norm = nnx.jit(lambda m, x: (m(x), m.post_layernorm(m(x, select_layer=-1))))(vit, pixels)
    np.testing.assert_allclose(last, before_norm, atol=1e-6)
    assert vit(pixels, select_layer=0).shape == (3, 4, 16)
    with pytest.raises(ValueError, match="pixels must be"):
        vit(jnp.zeros((1, 4, 4, 3)))


def test_hlo_group_size_forms():
    # The three replica-group spellings of compiled HLO (explicit, iota, and the mesh form of jax >= 0.12).
    from jaxeff.longvila.comm import _group_size

    assert _group_size("all-to-all(...), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={1}") == 4
    assert _group_size("all-gather(...), replica_groups=[4,2]<=[8], dimensions={1}") == 2
    assert _group_size("all-to-all(...), replica_groups=mesh['ring'=2,'ulysses'=4] {'ulysses'}, channel_id=1") == 4
    assert _group_size("all-reduce(...), replica_groups=mesh['ring'=2,'ulysses'=4] {'ring','ulysses'}") == 8
