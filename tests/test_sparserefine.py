"""SparseRefine: sparse conv geometry against dense convs, the spconv site rule, capacity errors, formulas."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxeff.sparserefine import (
    TAU,
    CapacityError,
    EntropyEnsembler,
    GatedEnsembler,
    LearnableSelector,
    RefinerConfig,
    SparseRefiner,
    UNetConfig,
    bucket_capacities,
    build_pyramid,
    check_capacity,
    coarse_mask,
    dice_loss,
    entropy,
    entropy_select,
    epoch_cosine_schedule,
    feature_channels,
    featurize,
    level_from_mask,
    logits_from_prediction,
    make_train_step,
    normalize_image,
    official_optimizer,
    pyramid_counts,
    refiner_loss,
    upsample_nearest,
)
from jaxeff.sparserefine.sparse import SUBM_OFFSETS, coarse_shape, down_table, subm_table, up_table
from jaxeff.sparserefine.synth import DenseSegNet
from jaxeff.sparserefine.unet import PointBatchNorm
from pallas_kernels.sparse_conv import gather_matmul_reference


@pytest.fixture(scope="module")
def tiny():
    cfg = RefinerConfig(num_classes=4, unet=UNetConfig(planes=(4, 6), reps=1), tau=0.6, capacity=400,
                        coarse_ratio=1.0)
    rng = np.random.default_rng(4)
    img = jnp.asarray(rng.normal(size=(2, 12, 15, 3)), jnp.float32)
    logits = jnp.asarray(rng.normal(size=(2, 12, 15, 4)) * 1.5, jnp.float32)
    return cfg, img, logits


SHAPES = [(1, 7, 9), (2, 13, 6)]
# jitted once per shape: op-by-op dispatch of the table builders is far slower than one compiled program
_level = jax.jit(level_from_mask, static_argnums=1)
_subm = jax.jit(subm_table)
_coarse = jax.jit(coarse_mask, static_argnums=1)
_down, _up = jax.jit(down_table), jax.jit(up_table)
_conv = jax.jit(gather_matmul_reference)
_pyramid = jax.jit(build_pyramid, static_argnums=(1, 2))
_apply = nnx.jit(lambda model, img, logits: model(img, logits))


def _mask(rng, shape, density):
    return rng.random(shape) < density


def _dense(level, feats, shape):
    """Scatter point features [cap, C] into a dense [B, H, W, C] grid (zeros elsewhere)."""
    out = np.zeros(shape + (feats.shape[-1],), np.float32)
    c = np.asarray(level.coords)[np.asarray(level.valid)]
    out[c[:, 0], c[:, 1], c[:, 2]] = np.asarray(feats)[np.asarray(level.valid)]
    return out


def _hwio(w):
    """[9, Cin, Cout] in (ky, kx) row-major order -> HWIO [3, 3, Cin, Cout]."""
    return jnp.asarray(w).reshape(3, 3, *w.shape[1:])


def _spconv_sites(mask):
    """TorchSparse "spconv" downsample (kernel 3, stride 2, padding 0) written out: o = (x - k) / 2 for k in 0..2,
    (x - k) even, 0 <= o <= (x_max - 2) // 2 with x_max the largest active coordinate per axis over the batch."""
    pts = np.argwhere(mask)
    if len(pts) == 0:
        return set()
    ymax, xmax = (pts[:, 1].max() - 2) // 2, (pts[:, 2].max() - 2) // 2
    sites = set()
    for b, y, x in pts:
        for ky in range(3):
            for kx in range(3):
                if (y - ky) % 2 or (x - kx) % 2:
                    continue
                oy, ox = (y - ky) // 2, (x - kx) // 2
                if 0 <= oy <= ymax and 0 <= ox <= xmax:
                    sites.add((int(b), int(oy), int(ox)))
    return sites


def _sites(level):
    return {tuple(int(v) for v in c) for c in np.asarray(level.coords)[np.asarray(level.valid)]}


@pytest.mark.parametrize("shape", SHAPES)
def test_submanifold_conv_equals_dense_conv_on_active_sites(shape):
    rng = np.random.default_rng(shape[1])
    for density in (0.0, 0.4):  # empty mask included
        mask = _mask(rng, shape, density)
        lv = _level(jnp.asarray(mask), int(np.prod(shape)) // 2 + 3)
        assert int(lv.count) == mask.sum() and _sites(lv) == {tuple(p) for p in np.argwhere(mask)}
        feats = jnp.where(lv.valid[:, None], jnp.asarray(rng.normal(size=(lv.capacity, 5)), jnp.float32), 0.0)
        w = jnp.asarray(rng.normal(size=(9, 5, 4)), jnp.float32)
        out = np.asarray(_conv(feats, _subm(lv), w))
        dense = jax.lax.conv_general_dilated(_dense(lv, feats, shape), _hwio(w), (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        valid = np.asarray(lv.valid)
        c = np.asarray(lv.coords)[valid]
        np.testing.assert_allclose(out[valid], np.asarray(dense)[c[:, 0], c[:, 1], c[:, 2]], rtol=1e-5, atol=1e-5)
        assert np.all(out[~valid] == 0)
    assert SUBM_OFFSETS[4] == (0, 0)


@pytest.mark.parametrize("shape", SHAPES + [(1, 2, 2)])
def test_stride2_sites_follow_spconv_rule_and_conv_equals_dense(shape):
    rng = np.random.default_rng(shape[2])
    for density in (0.0, 0.05, 0.5):
        mask = _mask(rng, shape, density)
        fine = _level(jnp.asarray(mask), int(np.prod(shape)))
        cmask = _coarse(jnp.asarray(mask), "spconv")
        assert {tuple(int(v) for v in p) for p in np.argwhere(np.asarray(cmask))} == _spconv_sites(mask)
        _, ho, wo = coarse_shape(shape)
        floor = {(int(b), int(y) // 2, int(x) // 2) for b, y, x in np.argwhere(mask)}
        floor = {s for s in floor if s[1] < ho and s[2] < wo}
        assert {tuple(int(v) for v in p) for p in np.argwhere(np.asarray(_coarse(jnp.asarray(mask), "floor")))} == floor
        if shape[1] < 3:
            continue
        coarse = _level(cmask, int(np.prod(coarse_shape(shape))))
        feats = jnp.where(fine.valid[:, None], jnp.asarray(rng.normal(size=(fine.capacity, 3)), jnp.float32), 0.0)
        w = jnp.asarray(rng.normal(size=(9, 3, 2)), jnp.float32)
        out = np.asarray(_conv(feats, _down(fine, coarse), w))
        dense = jax.lax.conv_general_dilated(_dense(fine, feats, shape), _hwio(w), (2, 2), "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        valid = np.asarray(coarse.valid)
        c = np.asarray(coarse.coords)[valid]
        np.testing.assert_allclose(out[valid], np.asarray(dense)[c[:, 0], c[:, 1], c[:, 2]], rtol=1e-5, atol=1e-5)


def test_transposed_conv_returns_to_fine_coordinates():
    rng = np.random.default_rng(3)
    shape = (2, 11, 9)
    mask = _mask(rng, shape, 0.3)
    pyr = _pyramid(jnp.asarray(mask), (int(np.prod(shape)), 40), "spconv")
    fine, coarse = pyr.levels
    assert pyr.up[0].shape == (fine.capacity, 9) and _sites(fine) == {tuple(p) for p in np.argwhere(mask)}
    np.testing.assert_array_equal(pyr.up[0], _up(fine, coarse))
    cf = jnp.where(coarse.valid[:, None], jnp.asarray(rng.normal(size=(coarse.capacity, 3)), jnp.float32), 0.0)
    w = jnp.asarray(rng.normal(size=(9, 3, 2)), jnp.float32)
    out = np.asarray(_conv(cf, pyr.up[0], w))
    # Dense transposed conv written out: fine x receives coarse o through offset k when x = 2 o + k.
    want = np.zeros((fine.capacity, 2), np.float32)
    coarse_pts = {tuple(int(v) for v in c): i for i, c in enumerate(np.asarray(coarse.coords)) if coarse.valid[i]}
    for i, (b, y, x) in enumerate(np.asarray(fine.coords)):
        if not fine.valid[i]:
            continue
        for k in range(9):
            ky, kx = divmod(k, 3)
            o = (int(b), (y - ky) // 2, (x - kx) // 2)
            if (y - ky) % 2 == 0 and (x - kx) % 2 == 0 and o in coarse_pts:
                want[i] += np.asarray(cf)[coarse_pts[o]] @ np.asarray(w)[k]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_capacity_overflow_raises_clear_error(tiny):
    mask = jnp.ones((1, 8, 8), bool)
    pyr = _pyramid(mask, (10, 10), "spconv")
    assert bool(pyr.overflow)
    with pytest.raises(CapacityError, match="level 0: 64 sites, capacity 10"):
        check_capacity(pyr.overflow, pyr.counts, (10, 10))
    pyr = _pyramid(mask, (64, 2), "spconv")  # the coarse level overflows
    with pytest.raises(CapacityError, match="level 1"):
        check_capacity(pyr.overflow, pyr.counts, (64, 2))
    cfg, img, logits = tiny
    one_level = UNetConfig(planes=(4,), reps=1)  # cheapest compile; the pyramid cases above cover coarse levels
    model = SparseRefiner(dataclasses.replace(cfg, unet=one_level, capacity=20), rngs=nnx.Rngs(0))
    out = _apply(model, img, logits)  # under jit: a flag, then a host-side check
    assert bool(out["overflow"])
    with pytest.raises(CapacityError, match="level 0"):
        model.check(out)
    with pytest.raises(ValueError, match="logits must be"):
        model(img, logits[:, :4])


def test_integer_images_and_unknown_presets_are_refused(tiny):
    cfg, img, logits = tiny
    model = SparseRefiner(dataclasses.replace(cfg, unet=UNetConfig(planes=(4,), reps=1)), rngs=nnx.Rngs(0))
    raw = jnp.full(img.shape, 128, jnp.uint8)  # an image not yet through normalize_image
    msg = r"got uint8 values; it expects the normalised float image .*: convert with .*normalize_image\(image\)"
    with pytest.raises(ValueError, match="SparseRefiner " + msg):
        model(raw, logits)
    with pytest.raises(ValueError, match="SparseRefiner got uint8"):  # under jit too (the dtype is static)
        _apply(model, raw, logits)
    coords, valid = jnp.zeros((3, 3), jnp.int32), jnp.ones(3, bool)
    with pytest.raises(ValueError, match="featurize got uint8"):
        featurize(raw, logits, coords, valid)
    with pytest.raises(ValueError, match="LearnableSelector got uint8"):
        LearnableSelector(4, 0.5, rngs=nnx.Rngs(0))(raw, logits)
    with pytest.raises(ValueError, match="DenseSegNet got uint8"):
        nnx.eval_shape(lambda: DenseSegNet(4, 4, rngs=nnx.Rngs(0)))(raw)  # abstract: its init compiles RNG programs
    with pytest.raises(ValueError, match=r"unknown tau preset 'hrnet'; known: \['hrnet_w48', 'mask2former_l'"):
        TAU["hrnet"]
    from experiments.sparserefine_synth import Config

    with pytest.raises(ValueError, match=r"downsample_mode='minkowski'; known: \('spconv', 'floor'\)"):
        Config(downsample_mode="minkowski").validate()
    with pytest.raises(ValueError, match="bad U-Net config"):
        Config(refiner_planes=()).validate()


def test_entropy_selector_formula_and_presets():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 4, 19)).astype(np.float32) * 3
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    h = -(p * np.log(np.maximum(p, 1e-5))).sum(-1)
    np.testing.assert_allclose(entropy(jnp.asarray(logits)), h, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(entropy_select(jnp.asarray(logits), 1.0), h > 1.0)
    assert TAU == {"hrnet_w48": 0.3, "segformer_b5": 0.1, "segnext_l": 0.1, "mask2former_t": 0.05,
                   "mask2former_l": 0.005}


def test_ensemblers_formulas():
    rng = np.random.default_rng(1)
    c = 5
    l1, l2 = (jnp.asarray(rng.normal(size=(7, c)) * 2, jnp.float32) for _ in range(2))
    e1, e2 = np.asarray(entropy(l1)), np.asarray(entropy(l2))
    np.testing.assert_array_equal(EntropyEnsembler()(l1, l2), np.where((e1 < e2)[:, None], l1, l2))
    g = GatedEnsembler(c, rngs=nnx.Rngs(0))

    def lin(layer, x):
        return x @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    a, b = np.asarray(l1), np.asarray(l2)
    x = np.concatenate([softmax(a), e1[:, None], softmax(b), e2[:, None]], -1)
    w = softmax(lin(g.attn2, np.maximum(lin(g.attn1, x), 0)))
    want = lin(g.fuse2, np.maximum(lin(g.fuse1, w[:, :1] * a + w[:, 1:] * b), 0))
    np.testing.assert_allclose(g(l1, l2), want, rtol=1e-4, atol=1e-5)
    assert g.attn1.kernel.shape == (2 * (c + 1), 64) and g.fuse2.kernel.shape == (64, c)


def test_loss_ignores_255_and_padding():
    out = {"coords": jnp.asarray([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0]], jnp.int32),
           "valid": jnp.asarray([True, True, True, False]),
           "logits/o/mask": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32),
           "logits/e/mask": jnp.zeros((4, 3))}
    labels = jnp.asarray([[[2, 255], [1, 0]]])
    loss, m = refiner_loss(out, labels)
    ce = optax.softmax_cross_entropy_with_integer_labels(out["logits/o/mask"][jnp.asarray([0, 2])],
                                                         jnp.asarray([2, 1]))
    np.testing.assert_allclose(m["ce_o"], ce.mean(), rtol=1e-6)
    np.testing.assert_allclose(m["ce_e"], np.log(3), rtol=1e-6)
    np.testing.assert_allclose(loss, ce.mean() + np.log(3), rtol=1e-6)
    assert int(m["points"]) == 2


def test_point_batch_norm_uses_active_rows_only():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(6, 3)) * 2 + 1, jnp.float32)
    valid = jnp.asarray([True, True, False, True, False, True])
    bn = PointBatchNorm(3)
    y = np.asarray(bn(x.at[2].set(1e6), valid))
    xv = np.asarray(x)[np.asarray(valid)]
    np.testing.assert_allclose(y[np.asarray(valid)], (xv - xv.mean(0)) / np.sqrt(xv.var(0) + 1e-5), rtol=1e-4,
                               atol=1e-5)
    assert np.all(y[~np.asarray(valid)] == 0)
    np.testing.assert_allclose(bn.mean[...], 0.1 * xv.mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * xv.var(0, ddof=1), rtol=1e-5)


def test_refiner_output_independent_of_capacity_padding(tiny):
    cfg, img, logits = tiny
    model = SparseRefiner(cfg, rngs=nnx.Rngs(0))
    a = _apply(model, img, logits)
    model.check(a)
    # Per-call capacities bucketed from host-side counts (the inference path of the experiment).
    counts = np.asarray(jax.jit(pyramid_counts, static_argnums=(1, 2))(a["mask"], 2, "spconv"))
    np.testing.assert_array_equal(counts, a["counts"])
    caps = bucket_capacities(counts, a["mask"].shape, minimum=16, growth=1.5, align=8)
    assert all(n <= c for n, c in zip(counts, caps)) and caps != cfg.capacities(a["mask"].shape)
    b = nnx.jit(lambda m, i, lg: m(i, lg, capacities=caps))(model, img, logits)
    model.check(b, caps)
    n = int(a["counts"][0])
    assert 0 < n < 360 and int(b["counts"][0]) == n and b["valid"].shape == (caps[0],)
    np.testing.assert_allclose(a["logits/e/mask"][:n], b["logits/e/mask"][:n], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(a["logits/e/full"], b["logits/e/full"], rtol=2e-4, atol=2e-5)
    keep = ~np.asarray(a["mask"])
    np.testing.assert_array_equal(np.asarray(a["logits/o/full"])[keep], np.asarray(logits)[keep])
    with pytest.raises(ValueError, match="capacities must be"):
        model(img, logits, capacities=(400,))


def test_bucket_capacities_ladder():
    caps = bucket_capacities([0, 1024, 1025, 5000], (1, 4096, 4096))
    assert caps == (1024, 1024, 1280, 5632)  # rungs 1024, 1280, 1664, 2176, 2816, 3584, 4480, 5632 (128-aligned)
    assert bucket_capacities([900, 900], (1, 30, 30)) == (900, 196)  # at most the grid: 30x30, then 14x14
    with pytest.raises(ValueError, match="growth"):
        bucket_capacities([1], (1, 8, 8), growth=1.0)


def test_train_step_updates_params_and_bn_stats(tiny):
    cfg, img, logits = tiny
    model = SparseRefiner(cfg, rngs=nnx.Rngs(1))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tx = official_optimizer(steps_per_epoch=2, epochs=4)
    step = make_train_step(graphdef, tx)
    labels = jnp.asarray(np.random.default_rng(5).integers(0, 4, (2, 12, 15)))
    batch = {"image": img, "logits": logits, "label": labels}
    p2, s2, _, m = step(params, stats, tx.init(params), batch)
    assert np.isfinite(float(m["loss"])) and not bool(m["overflow"])
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), stats, s2))
    assert all(changed)
    assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, p2)))


def test_official_optimizer_cosine_per_epoch():
    sched = epoch_cosine_schedule(3e-4, steps_per_epoch=3, epochs=4)
    want = [0.5 * 3e-4 * (1 + np.cos(np.pi * min(s // 3, 4) / 4)) for s in range(16)]
    np.testing.assert_allclose([float(sched(s)) for s in range(16)], want, rtol=1e-6, atol=1e-12)
    assert want[0] == want[2] == 3e-4 and want[-1] == 0.0  # constant within an epoch, 0 after T_max
    # AdamW's first update: -lr (m_hat / (sqrt(v_hat) + eps) + wd w) = -lr (1 + 0.05) for w = g = 1
    params = {"w": jnp.ones(())}
    tx = official_optimizer(3, 4)
    upd, _ = tx.update({"w": jnp.ones(())}, tx.init(params), params)
    np.testing.assert_allclose(upd["w"], -3e-4 * (1 + 0.05), rtol=1e-5)
    with pytest.raises(ValueError):
        official_optimizer(0)


def test_inputs_nearest_resize_and_normalisation():
    x = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)  # [C, h, w]
    up = logits_from_prediction(x, (4, 6))
    ys, xs = np.floor(np.arange(4) * 3 / 4).astype(int), np.floor(np.arange(6) * 2 / 6).astype(int)
    np.testing.assert_array_equal(up, x.transpose(1, 2, 0)[ys][:, xs])
    probs = logits_from_prediction(np.full((2, 1, 1), 0.5, np.float32), (2, 2), probabilities=True)
    np.testing.assert_allclose(probs, np.log(0.5))
    with pytest.raises(ValueError, match="negative"):
        logits_from_prediction(-x, (4, 6), probabilities=True)
    assert upsample_nearest(jnp.zeros((1, 5, 7, 2)), (10, 14)).shape == (1, 10, 14, 2)
    img = np.zeros((1, 1, 3), np.uint8)
    np.testing.assert_allclose(normalize_image(img)[0, 0], (-np.asarray([123.675, 116.28, 103.53]) /
                                                           np.asarray([58.395, 57.12, 57.375]))[::-1], rtol=1e-6)


def test_cityscapes_tfds_loader_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    from jaxeff.data.cityscapes import LABEL_TO_TRAIN_ID, CityscapesSource, to_train_ids

    assert LABEL_TO_TRAIN_ID[7] == 0 and LABEL_TO_TRAIN_ID[33] == 18 and LABEL_TO_TRAIN_ID[0] == 255
    with tfds.testing.mock_data(num_examples=2):
        src = CityscapesSource("validation")
        ex = src[1]
    assert len(src) == 2 and ex["image"].shape == (1024, 2048, 3) and ex["label"].shape == (1024, 2048)
    assert set(np.unique(ex["label"])) <= set(range(19)) | {255}
    np.testing.assert_array_equal(to_train_ids(np.asarray([[[26], [1]]], np.uint8)), [[13, 255]])
    with pytest.raises(ValueError, match="split"):
        CityscapesSource("val")


def test_featurizer_options_and_dice_loss(tiny):
    cfg, img, logits = tiny
    rng = np.random.default_rng(6)
    coords = jnp.asarray([[0, 3, 4], [1, 11, 14], [0, 0, 0]], jnp.int32)
    valid = jnp.asarray([True, True, False])
    got = np.asarray(featurize(img, logits, coords, valid, ("rgb", "xy", "p", "p>0.3")))
    p = np.asarray(jax.nn.softmax(logits[coords[:, 0], coords[:, 1], coords[:, 2]], -1))
    want = np.concatenate([np.asarray(img)[[0, 1, 0], [3, 11, 0], [4, 14, 0]], [[3 / 12, 4 / 15], [11 / 12, 14 / 15],
                                                                                [0, 0]], p, p > 0.3], -1)
    want[2] = 0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert feature_channels(("rgb", "xy", "p", "p>0.3"), 4) == 13
    with pytest.raises(ValueError, match="unknown feature"):
        featurize(img, logits, coords, valid, ("depth",))
    with pytest.raises(ValueError, match="input channels"):
        RefinerConfig(num_classes=4, features=("rgb", "xy"))
    # Dice (losses/dice.py) written out over the kept points; padding and label 255 excluded.
    lg = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    lab = np.asarray([0, 2, 2, 255, 1, 0])
    keep = np.asarray([True, True, True, True, True, False])
    k = keep & (lab != 255)
    pk = np.asarray(jax.nn.softmax(lg, -1))[k]
    t = np.eye(4)[lab[k]]
    want = 1 - np.mean(2 * (pk * t).sum(0) / ((pk + t).sum(0) + 1e-5))
    np.testing.assert_allclose(dice_loss(lg, jnp.asarray(np.where(k, lab, 0)), jnp.asarray(k)), want, rtol=1e-5)
    out = {"coords": jnp.asarray([[0, 0, i] for i in range(6)], jnp.int32), "valid": jnp.asarray(keep),
           "logits/o/mask": lg, "logits/e/mask": lg * 0.5}
    labels = jnp.asarray(lab[None, None])
    total, m = refiner_loss(out, labels, losses=("xent", "dice"))
    np.testing.assert_allclose(m["dice_o"], want, rtol=1e-5)
    np.testing.assert_allclose(total, m["ce_o"] + m["ce_e"] + m["dice_o"] + m["dice_e"], rtol=1e-6)
    np.testing.assert_allclose(refiner_loss(out, labels, losses=("dice",))[0], m["dice_o"] + m["dice_e"], rtol=1e-6)


def test_learnable_selector_matches_torch_and_drives_the_refiner(tiny):
    torch = pytest.importorskip("torch")
    cfg, img, logits = tiny
    cfg = dataclasses.replace(cfg, selector="learnable", tau=0.5, features=("rgb", "xy", "p"),
                              unet=UNetConfig(in_channels=9, planes=(4,), reps=1))
    model = SparseRefiner(cfg, rngs=nnx.Rngs(2))
    sel = model.selector
    # The official module (learnableSelector.py) rebuilt in torch with the same weights.
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU())
    mlp = torch.nn.Sequential(torch.nn.Linear(4 + 16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 1))
    with torch.no_grad():
        for tl, jl in ((conv[0], sel.conv1), (conv[2], sel.conv2)):
            tl.weight.copy_(torch.from_numpy(np.asarray(jl.kernel[...]).transpose(3, 2, 0, 1).copy()))
            tl.bias.copy_(torch.from_numpy(np.array(jl.bias[...])))
        for tl, jl in zip((mlp[0], mlp[2], mlp[4]), (sel.mlp1, sel.mlp2, sel.mlp3)):
            tl.weight.copy_(torch.from_numpy(np.asarray(jl.kernel[...]).T.copy()))
            tl.bias.copy_(torch.from_numpy(np.array(jl.bias[...])))
        feats = conv(torch.from_numpy(np.array(img)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        score = torch.sigmoid(mlp(torch.cat([torch.from_numpy(np.array(logits)), feats], -1)).squeeze(-1))
    np.testing.assert_allclose(sel.score(img, logits), score.numpy(), rtol=1e-4, atol=1e-5)
    want = score.numpy() > 0.5
    out = _apply(model, img, logits)
    np.testing.assert_array_equal(out["mask"], want)
    assert int(out["counts"][0]) == want.sum() and out["logits/e/full"].shape == logits.shape
