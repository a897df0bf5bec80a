"""LPD properties that need no reference data: orders, masks, KV-cached decoding vs the uncached forward, and bad
input refused by name at every public entry point."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.lpd import LPD, LPDConfig, generate, generate_images, load_lpd, preset, schedules
from jaxeff.lpd.model import cross_entropy, group_ids, training_mask
from jaxeff.lpd.orders import NumpyRandomness, batched_orders, locality_aware_order, random_orders
from jaxeff.lpd.training import lpd_loss

CFG = LPDConfig(dim=32, depth=2, num_heads=2, vocab_size=24, num_classes=5, grid_size=4, proj_dropout=0.0)


@pytest.fixture(scope="module")
def model():
    return LPD(CFG, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("sizes,cfg", [((1, 2, 3, 4, 6), 3.0), ((1,) * 16, 1.0)])
def test_kv_cached_decoding_equals_uncached_forward(model, sizes, cfg):
    orders = np.asarray(random_orders(jax.random.key(1), 3, 16))
    labels = np.array([0, 3, 4])
    out = generate(model, sizes, orders, labels, cfg=cfg, greedy=True, return_logits=True)
    forward = nnx.jit(lambda m, *a: m(*a))
    step_of = schedules.step_of(sizes)
    cond = forward(model, out["tokens"], labels, orders, step_of)
    np.testing.assert_allclose(out["cond_logits"], cond, rtol=1e-5, atol=2e-5)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(out["tokens"]), orders, 1), out["tokens_gen_order"])
    if cfg != 1.0:
        uncond = nnx.jit(lambda m, *a: m(a[0], None, *a[1:]))(model, out["tokens"], orders, step_of)
        np.testing.assert_allclose(out["uncond_logits"], uncond, rtol=1e-5, atol=2e-5)
        scale = 1 + (cfg - 1) * np.arange(16, dtype=np.float32) / 16
        guided = uncond + scale[None, :, None] * (cond - uncond)
        np.testing.assert_allclose(out["guided_logits"], guided, rtol=1e-5, atol=5e-5)
        np.testing.assert_array_equal(out["tokens_gen_order"], np.argmax(out["guided_logits"], -1))


def test_sampling_is_keyed_and_in_range(model):
    orders = batched_orders("raster", 4, 4)
    a = generate(model, (1, 5, 10), orders, [0, 1, 2, 3], cfg=2.0, temperature=1.0, key=jax.random.key(0))
    b = generate(model, (1, 5, 10), orders, [0, 1, 2, 3], cfg=2.0, temperature=1.0, key=jax.random.key(0))
    c = generate(model, (1, 5, 10), orders, [0, 1, 2, 3], cfg=2.0, temperature=1.0, key=jax.random.key(1))
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert (np.asarray(a["tokens"]) != np.asarray(c["tokens"])).any()
    assert 0 <= int(np.min(a["tokens"])) and int(np.max(a["tokens"])) < CFG.vocab_size
    with pytest.raises(ValueError, match="PRNG key"):
        generate(model, (1, 15), orders, None)
    with pytest.raises(ValueError, match="sum to 16"):
        generate(model, (1, 14), orders, None, greedy=True)


def test_training_mask_rule():
    sizes = (1, 3, 2, 4, 6)
    step_of = schedules.step_of(sizes)
    ids = np.asarray(group_ids(step_of))
    mask = np.asarray(training_mask(step_of))
    n = 16
    content, queries = np.arange(1, n + 1), np.arange(n + 1, 2 * n + 1)
    for q in queries:
        seen = mask[q]
        assert not seen[queries[step_of != step_of[q - n - 1]]].any()  # no other step's queries
        assert seen[queries[step_of == step_of[q - n - 1]]].all()  # mutual visibility
        np.testing.assert_array_equal(seen[content], step_of < step_of[q - n - 1])  # earlier content only
        assert seen[0]
    for k in content:
        assert not mask[k, queries].any()
        np.testing.assert_array_equal(mask[k, content], step_of <= step_of[k - 1])
    no_mv = np.asarray(training_mask(step_of, mutual_visibility=False))
    np.testing.assert_array_equal(no_mv[np.ix_(queries, queries)], np.eye(n, dtype=bool))
    np.testing.assert_array_equal(no_mv[:, : n + 1], mask[:, : n + 1])
    assert ids[0] == 0 and set(ids[queries] % 2) == {1}


@pytest.mark.parametrize("grid,res,steps,rho", [(16, 256, 20, 2), (16, 256, 32, 2), (8, None, None, 1)])
def test_locality_order_properties(grid, res, steps, rho):
    sizes = schedules.group_sizes(res, steps) if res else (1, 3, 5, 7, 9, 11, 13, 15)
    rnd = NumpyRandomness(0)
    for _ in range(3):
        order, counts = locality_aware_order(grid, sizes, 1.0, rho, rnd, return_proximity_counts=True)
        assert sorted(order.tolist()) == list(range(grid * grid))
        cs = schedules.cumsum(sizes) - 1
        for s in range(1, len(sizes)):
            step = order[cs[s + 1]: cs[s + 2]]
            assert len(step) == sizes[s]
            earlier = set(order[: cs[s + 1]].tolist())
            prox = [divmod(int(c), grid) for c in step[: counts[s]]]
            for i, (r, c) in enumerate(prox):
                # a proximity pick touches an earlier step's cell and repels this step's other proximity picks
                assert any((r + dr) * grid + c + dc in earlier for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                           if 0 <= r + dr < grid and 0 <= c + dc < grid)
                assert all(max(abs(r - r2), abs(c - c2)) > rho for r2, c2 in prox[i + 1:])
        assert counts[1:].sum() > 0


def test_orders_are_permutations():
    for kind in ("raster", "random", "locality"):
        o = batched_orders(kind, 3, 8, (1, 3, 5, 7, 9, 11, 13, 15), seed=2)
        assert o.shape == (3, 64)
        assert all(sorted(row.tolist()) == list(range(64)) for row in o)
    r = batched_orders("random", 3, 8)
    assert len({tuple(row) for row in r.tolist()}) == 3


def test_presets_match_the_released_sizes():
    def params(cfg):
        m = nnx.eval_shape(lambda: LPD(cfg, rngs=nnx.Rngs(0)))
        return sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))

    counts = {}
    for name in ("lpd_l_256", "lpd_xl_256", "lpd_xxl_256"):
        cfg = preset(name)
        one, two = (params(dataclasses.replace(cfg, depth=d)) for d in (1, 2))  # blocks are identical
        counts[name] = (one + (cfg.depth - 1) * (two - one)) / 1e6
    assert round(counts["lpd_l_256"]) == 337 and round(counts["lpd_xl_256"]) == 752
    assert round(counts["lpd_xxl_256"] / 100) == 14
    assert preset("lpd_xl_512").num_tokens == 1024
    with pytest.raises(ValueError, match="unknown LPD preset"):
        preset("lpd_s_256")


def test_training_step_learns_and_decays_like_the_official_recipe():
    from jaxeff.lpd.training import LPDOptimConfig, cosine_group_sizes, make_optimizer, training_schedules
    from jaxeff.train.step import init_train_state, make_train_step

    for k in (16, 8, 5, 1):
        sizes = cosine_group_sizes(16, k)
        assert len(sizes) == k and sum(sizes) == 16 and sizes[0] == (1 if k > 1 else 16)
    assert training_schedules(256)[5] == schedules.group_sizes(256, 20)

    model = LPD(dataclasses.replace(CFG, depth=1, proj_dropout=0.1), rngs=nnx.Rngs(0))
    model.train()
    ocfg = LPDOptimConfig(blr=3e-3 * 256 / 8, batch_size=8, warmup_steps=1, total_steps=8, cosine_steps=2)
    tx = make_optimizer(ocfg)
    graphdef, state = init_train_state(model, tx)
    step = make_train_step(graphdef, lpd_loss, tx)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 4, (8, 16)), jnp.int32)  # 4 of 24 codes used
    losses = []
    for i in range(8):
        batch = {"tokens": tokens, "labels": jnp.arange(8) % 5, "key": jax.random.key(i),
                 "step_of": jnp.asarray(schedules.step_of(cosine_group_sizes(16, (16, 4)[i % 2])))}
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.5, losses
    assert step._cache_size() == 1  # both schedules (16 and 4 steps) ran in one compiled program

    # weight decay: every parameter with ndim >= 2 (pos_embed, mask_token, fake_latent, kernels), no bias / norm
    params = {"pos_embed": jnp.ones((1, 3, 4)), "fake_latent": jnp.ones((1, 4)), "bias": jnp.ones(4)}
    opt_state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(2):  # the first update has lr 0 (warm-up starts at 0)
        updates, opt_state = tx.update(zeros, opt_state, params)
    assert float(updates["pos_embed"].max()) < 0 and float(updates["fake_latent"].max()) < 0
    assert float(abs(updates["bias"]).max()) == 0


def test_hf_sources_resolve_without_network(monkeypatch, tmp_path):
    from jaxeff.io import hub
    from jaxeff.lpd.weights import resolve

    calls, served = [], {"mit-han-lab/lpd_l_256": ["lpd_l_256.pth"], "FoundationVision/LlamaGen": ["vq_ds16_c2i.pt"]}

    def fake_snapshot(repo, revision=None, allow_patterns=None, cache_dir=None):
        calls.append((repo, allow_patterns))
        root = tmp_path / repo
        for name in served[repo]:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).touch()
        return str(root)

    monkeypatch.setattr(hub, "_snapshot", fake_snapshot)
    assert resolve("hf:mit-han-lab/lpd_l_256") == tmp_path / "mit-han-lab/lpd_l_256/lpd_l_256.pth"
    assert resolve("hf:FoundationVision/LlamaGen/vq_ds16_c2i.pt") == \
        tmp_path / "FoundationVision/LlamaGen/vq_ds16_c2i.pt"
    assert calls == [("mit-han-lab/lpd_l_256", ["*.pth", "*.pt", "*.safetensors"]),
                     ("FoundationVision/LlamaGen", ["vq_ds16_c2i.pt", "vq_ds16_c2i.pt/*"])]
    assert resolve(tmp_path / "x.pth") == tmp_path / "x.pth"
    served["mit-han-lab/lpd_l_256"] = ["a.pth", "b.pth"]
    with pytest.raises(ValueError, match="name one"):
        resolve("hf:mit-han-lab/lpd_l_256")
    with pytest.raises(ValueError, match="is not 'hf:"):
        resolve("hf:nothing")


def test_dot_product_backend_matches_the_reference(model):
    orders = np.asarray(random_orders(jax.random.key(2), 2, 16))
    step_of = schedules.step_of((1, 5, 10))
    forward = nnx.jit(lambda m, o, impl: m(np.zeros((2, 16), np.int32), np.array([1, 2]), o, step_of,
                                            implementation=impl), static_argnums=2)
    np.testing.assert_allclose(forward(model, orders, "dot_product"), forward(model, orders, "xla"),
                               rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_uses_the_official_names(model):
    from flax import traverse_util

    from jaxeff.lpd.vq import VQConfig, VQModel
    from jaxeff.lpd.weights import load_into, official_key, state_dict

    sd = state_dict(model)
    assert sd["blocks.1.attn.qkv.weight"].shape == (3 * CFG.dim, CFG.dim)  # torch [out, in]
    assert sd["head.weight"].shape == (CFG.vocab_size, CFG.dim) and "head.bias" not in sd
    back = load_into(nnx.eval_shape(lambda: LPD(CFG, rngs=nnx.Rngs(1))), sd)
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(back, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    vq = nnx.eval_shape(lambda: VQModel(VQConfig(codebook_size=16, ch=32, ch_mult=(1, 2), z_channels=32),
                                        rngs=nnx.Rngs(0)))
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(vq, nnx.Param)))
    names = {official_key(p): v.shape for p, v in flat.items()}
    assert names["encoder.conv_blocks.1.res.0.nin_shortcut.weight"] == (1, 1, 32, 64)  # ours: [kh, kw, in, out]
    assert "decoder.conv_blocks.0.upsample.conv.weight" in names  # block 0 is the lowest resolution
    assert "decoder.conv_blocks.1.upsample.conv.weight" not in names
    assert "encoder.conv_blocks.1.attn.1.proj_out.bias" in names and "decoder.mid.1.q.weight" in names
    assert "quantize.embedding.weight" in names and "post_quant_conv.weight" in names


@pytest.fixture(scope="module")
def vq():  # factor 16: 16x16 tokens -> 256px, the official 256px tables
    from jaxeff.lpd.vq import VQConfig, VQModel

    return VQModel(VQConfig(codebook_size=16, ch=32, ch_mult=(1,) * 5, z_channels=32, num_res_blocks=0),
                   rngs=nnx.Rngs(1))


def test_generate_images_is_orders_then_decoding_then_the_vq(vq):
    from jaxeff.lpd import generate_images
    from jaxeff.lpd.vq import to_uint8

    lpd = LPD(dataclasses.replace(CFG, vocab_size=16, grid_size=16), rngs=nnx.Rngs(0))
    out = generate_images(lpd, vq, [1, 4], steps=8, cfg=3.0, seed=3)
    sizes = schedules.group_sizes(256, 8)
    orders = batched_orders("locality", 2, 16, sizes, seed=3, proximity_threshold=1.0, repulsion_threshold=2.0)
    np.testing.assert_array_equal(out["orders"], orders)
    ref = generate(lpd, sizes, orders, [1, 4], cfg=3.0, key=jax.random.key(3))["tokens"]
    np.testing.assert_array_equal(out["tokens"], ref)
    assert out["images"].shape == (2, 256, 256, 3) and out["images"].dtype == np.uint8
    decoded = nnx.jit(lambda m, ids: to_uint8(m.decode_code(ids)))(vq, ref.reshape(2, 16, 16))  # jit: eager is 7 s
    assert np.abs(np.asarray(out["images"], np.int16) - np.asarray(decoded, np.int16)).max() <= 1  # float rounding
    again = generate_images(lpd, vq, [1, 4], steps=8, cfg=3.0, orders=out["orders"], key=jax.random.key(3))
    np.testing.assert_array_equal(again["images"], out["images"])
    with pytest.raises(ValueError, match="no official 256px schedule with 7 steps"):
        generate_images(lpd, vq, [1, 4], steps=7)


class _NotAllowed:  # a pickled object the safe loader must refuse
    pass


def test_safe_pickle_loader_takes_training_args_and_refuses_other_objects(model, tmp_path):
    import argparse

    torch = pytest.importorskip("torch")
    from jaxeff.lpd.weights import load_lpd, read_state_dict, state_dict

    sd = {k: torch.from_numpy(np.array(v)) for k, v in state_dict(model).items()}
    # the official training-checkpoint layout (util/misc.py save_model): args is an argparse.Namespace
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95)}]},
                "epoch": 3, "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="lpd_l", blr=1e-4)},
               tmp_path / "ckpt.pth")
    loaded = load_lpd(tmp_path / "ckpt.pth", num_heads=CFG.num_heads)  # weights_only=True by default
    np.testing.assert_array_equal(loaded.pos_embed[...], model.pos_embed[...])
    torch.save({"model": sd, "extra": _NotAllowed()}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="(?s)_NotAllowed.*weights_only=False only for a file you trust"):
        read_state_dict(tmp_path / "odd.pth")
    assert set(read_state_dict(tmp_path / "odd.pth", weights_only=False)) == set(sd)


def test_pos_embed_interpolation_is_torchs_bicubic_and_load_lpd_applies_it(model, tmp_path):
    torch = pytest.importorskip("torch")
    from jaxeff.io.safetensors import save_file
    from jaxeff.lpd.weights import interpolate_pos_embed, load_lpd, state_dict

    pe = np.random.default_rng(0).normal(size=(1, 17, 6)).astype(np.float32)  # 4x4 grid + class slot
    for new in (8, 3, 7):
        grid = torch.from_numpy(pe[0, 1:]).reshape(1, 4, 4, 6).permute(0, 3, 1, 2)
        ref = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic").permute(0, 2, 3, 1)
        out = interpolate_pos_embed(pe, new)
        np.testing.assert_allclose(out[0, 1:], ref.reshape(new * new, 6).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out[:, :1], pe[:, :1])
    with pytest.raises(ValueError, match="square grid|g\\*g"):
        interpolate_pos_embed(pe[:, :16], 8)

    save_file(state_dict(model), tmp_path / "m.safetensors")
    big = dataclasses.replace(CFG, grid_size=8)  # e.g. a 256px checkpoint into a 512px model
    loaded = load_lpd(tmp_path / "m.safetensors", big)
    np.testing.assert_allclose(loaded.pos_embed[...], interpolate_pos_embed(model.pos_embed[...], 8), rtol=1e-6)
    np.testing.assert_array_equal(loaded.head.kernel[...], model.head.kernel[...])


# Bad input is refused by name (never NaN or a silently wrong answer outside jit; under jit, where values cannot be
# inspected, an id out of range gives NaN, never a wrapped or clamped row).
SIZES = (1, 5, 10)


def test_vq_decode_code_takes_flat_square_ids_and_refuses_bad_ones(vq):
    ids = np.arange(16).reshape(1, 4, 4)
    grid = np.asarray(vq.decode_code(ids))
    assert grid.shape == (1, 64, 64, 3) and np.isfinite(grid).all()
    np.testing.assert_array_equal(vq.decode_code(ids.reshape(1, 16)), grid)  # flat raster tokens, N = 4 * 4
    for bad in (16, -1):  # 16 used to decode to NaN, -1 to the last code
        with pytest.raises(ValueError, match=rf"ids must lie in \[0, 16\).*first is {bad} at index \(0, 1, 2\)"):
            vq.decode_code(np.where(np.arange(16).reshape(1, 4, 4) == 6, bad, ids))
    with pytest.raises(TypeError, match="integer ids, got dtype float"):
        vq.decode_code(ids + 0.5)
    with pytest.raises(ValueError, match=r"square N.*\(1, 15\)"):
        vq.decode_code(ids.reshape(1, 16)[:, :15])
    with pytest.raises(ValueError, match=r"\[B, h, w\].*\(1, 1, 4, 4\)"):
        vq.decode_code(ids[None])
    # under jit the ids are not inspected: an id out of range gives NaN pixels, not a wrapped code
    traced = nnx.jit(lambda m, i: m.decode_code(i))
    out = np.asarray(traced(vq, jnp.asarray(np.stack([ids[0], np.full((4, 4), -1)]))))
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).any()
    with pytest.raises(ValueError, match="code ids go to decode_code"):
        vq.decode(ids)
    with pytest.raises(TypeError, match="float in \\[-1, 1\\]"):
        vq.encode(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="NHWC"):
        vq.encode(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="float in \\[-1, 1\\].*got a max of 255"):
        vq.encode(np.full((1, 32, 32, 3), 255.0, np.float32))
    # the decoder's own output overshoots [-1, 1] a little (no check in the official encoder): it re-encodes
    assert np.abs(grid).max() > 1
    np.testing.assert_array_equal(vq.encode(grid)[0].shape, (1, 4, 4))


def test_generate_refuses_bad_orders_labels_keys_and_schedules(model):
    orders = np.asarray(random_orders(jax.random.key(0), 2, 16))
    dup = orders.copy()
    dup[1, 3] = dup[1, 4]
    with pytest.raises(ValueError, match=r"permutations of range\(16\); row 1 has 1 repeated ids"):
        generate(model, SIZES, dup, [0, 1], greedy=True)
    with pytest.raises(ValueError, match=r"row 0 \(and 1 other rows\) has 1 ids outside \[0, 16\)"):
        generate(model, SIZES, orders + 1, [0, 1], greedy=True)
    with pytest.raises(TypeError, match="orders must be integer ids"):
        generate(model, SIZES, orders.astype(np.float32), [0, 1], greedy=True)
    with pytest.raises(TypeError, match="labels must be integer ids"):
        generate(model, SIZES, orders, [0.5, 1.0], greedy=True)
    with pytest.raises(ValueError, match=r"labels must be \[B\] = \[2\].*got shape \(3,\)"):
        generate(model, SIZES, orders, [0, 1, 2], greedy=True)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\).*first is 5 at index 1"):
        generate(model, SIZES, orders, [0, 5], greedy=True)
    with pytest.raises(TypeError, match="one PRNG key such as jax.random.key"):
        generate(model, SIZES, orders, [0, 1], key=0)
    with pytest.raises(TypeError, match="sequence of ints.*got int 3"):
        generate(model, 3, orders, [0, 1], greedy=True)
    with pytest.raises(ValueError, match="whole numbers"):
        generate(model, (1.5, 5, 9.5), orders, [0, 1], greedy=True)
    with pytest.raises(ValueError, match=r"temperature must be a number in \[0.0, inf\)"):
        generate(model, SIZES, orders, [0, 1], temperature=-1.0, key=jax.random.key(0))


def test_forward_and_training_loss_refuse_bad_batches(model):
    orders = np.asarray(random_orders(jax.random.key(0), 2, 16))
    tokens = np.random.default_rng(0).integers(0, 16, (2, 16))
    step_of = schedules.step_of(SIZES)
    labels = np.array([0, 1])
    with pytest.raises(TypeError, match="tokens must be integer ids"):
        model(tokens / 16, labels, orders, step_of)  # an image in [0, 1) used to be truncated to token 0
    with pytest.raises(ValueError, match=r"tokens and orders \[B, N = 16\].*got tokens \(2, 4, 4\)"):
        model(tokens.reshape(2, 4, 4), labels, orders, step_of)
    with pytest.raises(ValueError, match=r"got tokens \(2, 8\)"):  # used to gather out of range: NaN
        model(tokens[:, :8], labels, orders, step_of)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 24\)"):
        model(tokens + 24, labels, orders, step_of)
    with pytest.raises(ValueError, match=r"step_of must be a schedule"):
        model(tokens, labels, orders, step_of - 1)
    with pytest.raises(ValueError, match=r"row 0 \(and 1 other rows\) has 1 repeated"):
        model(tokens, labels, np.zeros_like(orders) + np.eye(1, 16, 1, dtype=int), step_of)
    # under jit an out-of-range token or label gives that sample NaN logits and loss, not a wrapped row
    first = orders[1, 0]  # raster index of sample 1's first generated token: every later query sees it
    bad = jnp.asarray(tokens).at[1, first].set(-1)
    forward = nnx.jit(lambda m, t, lab: m(t, lab, orders, step_of))
    out = np.asarray(forward(model, bad, jnp.asarray([4, 1])))
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).any()
    out = np.asarray(forward(model, jnp.asarray(tokens), jnp.asarray([9, 1])))
    assert np.isnan(out[0]).any() and np.isfinite(out[1]).all()
    ce = np.asarray(jax.jit(cross_entropy)(jnp.zeros((2, 16, 24)), bad, orders))
    assert np.isnan(ce[1, 0]) and np.isfinite(np.delete(ce, 16)).all()  # -1 is no class

    batch = {"tokens": tokens, "labels": labels, "step_of": step_of, "key": jax.random.key(0)}
    with pytest.raises(TypeError, match="tokens must be integer ids"):
        lpd_loss(model, batch | {"tokens": tokens.astype(np.float32)})
    with pytest.raises(ValueError, match=r"batch tokens must be \[B, N = 16\].*\(2, 4, 4\)"):
        lpd_loss(model, batch | {"tokens": tokens.reshape(2, 4, 4)})
    with pytest.raises(KeyError, match=r"missing \['key'\]"):
        lpd_loss(model, {k: v for k, v in batch.items() if k != "key"})
    with pytest.raises(TypeError, match="batch key must be one PRNG key"):
        lpd_loss(model, batch | {"key": 3})


def test_generate_images_orders_schedules_and_loaders_refuse_mistakes(model, tmp_path):
    from jaxeff.lpd.vq import VQConfig, VQModel

    def abstract_vq(codes):  # factor 16, shapes only: every check runs before the VQ is used
        cfg = VQConfig(codebook_size=codes, ch=32, ch_mult=(1,) * 5, z_channels=32, num_res_blocks=0)
        return nnx.eval_shape(lambda: VQModel(cfg, rngs=nnx.Rngs(0)))

    vq24, small = abstract_vq(24), abstract_vq(8)
    with pytest.raises(ValueError, match=r"1-D list of class ids.*shape \(\)"):
        generate_images(model, vq24, 3, steps=8)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        generate_images(model, vq24, [7], steps=8)
    with pytest.raises(ValueError, match=r"LPD vocabulary \(24\) must be the VQ codebook \(8\)"):
        generate_images(model, small, [1], steps=8)  # tokens >= 8 used to decode to NaN images
    with pytest.raises(TypeError, match="steps must be an integer, got str"):
        generate_images(model, vq24, [1], steps="20")
    with pytest.raises(ValueError, match="no official schedules for 16px.*image pixels"):
        schedules.group_sizes(16, 20)
    with pytest.raises(ValueError, match="batch must be an integer >= 1, got 0"):
        batched_orders("raster", 0, 4)
    with pytest.raises(ValueError, match="grid must be an integer >= 1, got 4.0"):
        locality_aware_order(4.0, SIZES)
    with pytest.raises(TypeError, match="one PRNG key"):
        random_orders(0, 2, 16)
    with pytest.raises(TypeError, match=r"config must be an LPDConfig.*got str 'lpd_l_256'"):
        load_lpd(tmp_path / "m.safetensors", "lpd_l_256")
    pytest.importorskip("torch")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable torch pickle"):
        load_lpd(tmp_path / "junk.pth")
