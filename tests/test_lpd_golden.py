"""LPD vs the official code's outputs on a tiny random model (../shared/data/lpd_golden, see its README).

Tolerances are the README's (section 8): float32 on CPU."""

import numpy as np
import pytest
from flax import nnx

from jaxeff.lpd import schedules
from jaxeff.lpd.model import block_causal_mask, cross_entropy, training_mask
from jaxeff.lpd.sampling import generate
from jaxeff.lpd.weights import CheckpointMismatchError, load_lpd, read_state_dict

N = 64


@pytest.fixture(scope="module")
def golden(shared_data):
    return shared_data("lpd_golden")


@pytest.fixture(scope="module")
def model(golden):
    return load_lpd(golden / "lpd_tiny.safetensors", num_heads=4, proj_dropout=0.0)


def _without_last_content(x, g_last, axis):
    """Static layout (2N + 1) -> the official one (2N + 1 - gK): drop the last step's content slots."""
    return np.delete(np.asarray(x), np.arange(N + 1 - g_last, N + 1), axis=axis)


@pytest.mark.parametrize("case", ["A", "B", "C"])
def test_training_forward(golden, model, case):
    d = np.load(golden / f"train_{case}.npz")
    sizes, orders = d["group_sizes"], d["orders"]
    np.testing.assert_array_equal(schedules.cumsum(sizes), d["cumsum"])
    forward = nnx.jit(lambda m, *a: (m(*a, return_hidden=True), m.training_sequence(*a[:3], a[4])))
    (logits, hidden), seq = forward(model, d["tokens"], d["labels"], orders.astype(np.int32),
                                    schedules.step_of(sizes), d["label_dropped"])
    np.testing.assert_allclose(_without_last_content(seq, sizes[-1], 1), d["seq_input"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(logits, d["logits"], rtol=1e-5, atol=5e-5)
    if "final_hidden" in d:
        np.testing.assert_allclose(hidden, d["final_hidden"], rtol=0, atol=2e-5)
    ce = cross_entropy(logits, d["tokens"], orders)
    np.testing.assert_allclose(ce, d["per_token_ce"], rtol=0, atol=5e-5)
    np.testing.assert_allclose(float(ce.mean()), float(d["loss"]), rtol=1e-5)


def test_block0_output(golden, model):
    d = np.load(golden / "train_A.npz")
    sizes = d["group_sizes"]

    @nnx.jit
    def block0(m, tokens, labels, orders, step_of, dropped):
        return m.blocks[0](m.training_sequence(tokens, labels, orders, dropped), training_mask(step_of)[None])[0]

    out = block0(model, d["tokens"], d["labels"], d["orders"].astype(np.int32), schedules.step_of(sizes),
                 d["label_dropped"])
    np.testing.assert_allclose(_without_last_content(out, sizes[-1], 1), d["block0_out"], rtol=0, atol=2e-5)


@pytest.mark.parametrize("case", ["train_A", "train_B", "train_C", "mask_256px_20steps"])
def test_training_mask(golden, case):
    d = np.load(golden / f"{case}.npz")
    sizes = d["group_sizes"]
    n = int(sum(sizes))
    prefix = "train_" if case.startswith("mask") else ""
    mask = np.asarray(training_mask(schedules.step_of(sizes)))
    assert mask.shape == (2 * n + 1, 2 * n + 1)
    drop = np.arange(n + 1 - sizes[-1], n + 1)
    official = np.delete(np.delete(mask, drop, 0), drop, 1)
    np.testing.assert_array_equal(official, d[f"{prefix}attn_mask"])
    # the dropped content slots are invisible to every other position
    assert not mask[np.setdiff1d(np.arange(2 * n + 1), drop)][:, drop].any()
    if prefix:
        np.testing.assert_array_equal(block_causal_mask(d["cumsum"]), d["infer_attn_mask"])


@pytest.mark.parametrize("case", ["A", "B", "C", "D"])
def test_kstep_greedy_decoding(golden, model, case):
    d = np.load(golden / f"infer_{case}.npz")
    np.testing.assert_array_equal(block_causal_mask(d["cumsum"]), d["attn_mask"])
    labels = None if d["labels"][0] < 0 else d["labels"]
    schedule = "constant" if case == "C" else "linear"  # README 5.2
    out = generate(model, d["group_sizes"], d["orders"], labels, cfg=float(d["cfg"]), cfg_schedule=schedule,
                   greedy=True, return_logits=True)
    np.testing.assert_array_equal(out["tokens_gen_order"], d["tokens_gen_order"])
    np.testing.assert_array_equal(out["tokens"], d["tokens"])
    for name in ("cond_logits", "uncond_logits", "guided_logits"):
        if name in d:
            np.testing.assert_allclose(out[name], d[name], rtol=1e-5, atol=5e-5, err_msg=name)


def test_pickle_matches_safetensors_and_mismatch_is_named(golden, model, tmp_path):
    pytest.importorskip("torch")
    st, pth = read_state_dict(golden / "lpd_tiny.safetensors"), read_state_dict(golden / "lpd_tiny.pth")
    assert sorted(st) == sorted(pth)
    for k in st:
        np.testing.assert_array_equal(st[k], pth[k])
    from jaxeff.io.safetensors import save_file

    bad = dict(st)
    bad.pop("mask_token")
    bad["extra.weight"] = np.zeros(3, np.float32)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: \['mask_token'\].*unexpected keys: \['extra"):
        load_lpd(tmp_path / "bad.safetensors", num_heads=4)


def test_schedules_are_the_official_tables(golden):
    import json

    lookup = json.loads((golden / "tables" / "group_sizes_lookup.json").read_text())
    for res in (256, 512):
        table = lookup[f"{res} resolution"]
        assert sorted(schedules.GROUP_SIZES[res]) == sorted(int(k.split()[0]) for k in table)
        for key, sizes in table.items():
            assert list(schedules.group_sizes(res, int(key.split()[0]))) == sizes
        training = json.loads((golden / "tables" / "group_sizes_training" / f"group_sizes_{res}.json").read_text())
        assert [list(schedules.GROUP_SIZES[res][k]) for k in schedules.TRAINING_STEPS[res]] == training


@pytest.fixture(scope="module")
def vq(golden):
    from jaxeff.lpd.vq import VQConfig, load_vq

    return load_vq(golden / "vq_tiny.safetensors", VQConfig(codebook_size=64, ch=32, ch_mult=(1, 1), z_channels=32))


@pytest.fixture(scope="module")
def vq_decode():
    """One compiled program for both decode paths (B = 2, 8x8 latents), shared by the tests below."""
    return nnx.jit(lambda m, z, i: (m.decode(z), m.decode_code(i)))


def _nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def test_vq_encode_decode(golden, vq, vq_decode):
    d = np.load(golden / "vq.npz")
    image = d["image"].transpose(0, 2, 3, 1)
    (idx, zq, h), enc = nnx.jit(lambda m, x: (m.encode(x), m.encoder(x)))(vq, image)
    np.testing.assert_allclose(_nchw(enc), d["encoder_out"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(_nchw(h), d["pre_quant"], rtol=0, atol=2e-5)
    np.testing.assert_array_equal(idx, d["indices"])
    np.testing.assert_allclose(_nchw(zq), d["quant"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(_nchw(zq), d["codebook_entry"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(vq.quantize.codebook(), d["codebook_normalized"], rtol=0, atol=2e-5)
    from_quant, from_indices = vq_decode(vq, zq, d["indices"])
    np.testing.assert_allclose(_nchw(from_quant), d["decoded_from_quant"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(_nchw(from_indices), d["decoded_from_indices"], rtol=0, atol=2e-5)


def test_vq_decodes_generated_tokens(golden, vq, vq_decode):
    from jaxeff.lpd.vq import to_uint8

    d = np.load(golden / "infer_A.npz")
    _, image = vq_decode(vq, np.zeros((2, 8, 8, 8), np.float32), d["tokens"].reshape(2, 8, 8))
    np.testing.assert_allclose(_nchw(image), d["vq_decoded"], rtol=0, atol=2e-5)
    np.testing.assert_array_equal(to_uint8(image), d["image_uint8"])


def test_vq_resnet_block_with_nin_shortcut(golden):
    from flax import nnx

    from jaxeff.lpd.weights import load_into
    from jaxeff.nn.vqgan import ResnetBlock

    d = np.load(golden / "vq_resblock_nin.npz")
    block = nnx.eval_shape(lambda: ResnetBlock(32, 64, rngs=nnx.Rngs(0)))
    block = load_into(block, read_state_dict(golden / "vq_resblock_nin.safetensors"))
    np.testing.assert_allclose(_nchw(block(d["x"].transpose(0, 2, 3, 1))), d["y"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["g8_r1", "g8_r2", "g8_tau10", "g16_20steps_r2", "g16_20steps_r3",
                                  "g16_32steps_r2", "g32_48steps_r4"])
def test_locality_order_replays_official_trace(golden, name):
    from jaxeff.lpd.orders import TraceRandomness, locality_aware_order

    d = np.load(golden / "orders" / f"order_{name}.npz")
    rnd = TraceRandomness(d)
    order = locality_aware_order(int(d["grid_size"]), d["group_sizes"], float(d["proximity_threshold"]),
                                 float(d["repulsion_threshold"]), rnd)
    np.testing.assert_array_equal(order, d["order"])
    assert rnd.unused_draws() == 0
    if name.startswith("g16_20") or name.startswith("g16_32") or name.startswith("g32"):
        steps, res = len(d["group_sizes"]), 16 * int(d["grid_size"])
        assert tuple(d["group_sizes"]) == schedules.group_sizes(res, steps)


def test_farthest_point_sampling_unit(golden):
    from jaxeff.lpd.orders import farthest_point_sampling

    d = np.load(golden / "orders" / "order_fps_unit.npz")
    picked = farthest_point_sampling(d["existing"], d["pool"], int(d["num_to_select"]), int(d["grid_size"]))
    np.testing.assert_array_equal(picked, d["picked"])
