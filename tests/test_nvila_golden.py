"""NVILA preprocessing, scale merge, area interpolation and projectors against the official code's outputs in
../shared/data/nvila_golden (see its README for how every array was made)."""

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import PIL
import pytest

from jaxeff.models.vit import space_to_channel
from jaxeff.nvila import features as F
from jaxeff.nvila import tiling
from jaxeff.nvila.projector import load_projector

GOLDEN = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nvila_golden"
pytestmark = pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"{GOLDEN} (shared golden data) is absent in this clone")
CASES = [(448, 448), (1920, 1080), (1080, 1920), (2048, 1024), (640, 480), (300, 500), (1344, 1344), (896, 448)]
HASH_KEY = "tile_sha256_pillow13" if int(PIL.__version__.split(".")[0]) >= 13 else "tile_sha256"


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    # GPU / TPU default matmuls use bf16 passes, which miss the 1e-4 tolerance (README of the golden data)
    with jax.default_matmul_precision("highest"):
        yield


def synthetic_image(w, h):
    y, x = np.mgrid[0:h, 0:w]
    bx, by = x // 40, y // 40
    rgb = [(37 * bx + 91 * by + 11), (53 * bx + 17 * by**2 + 101), (29 * bx * by + 7 * bx + 3 * by + 200)]
    return (np.stack(rgb, -1) % 256).astype(np.uint8)


def _load(name):
    return np.load(GOLDEN / f"{name}.npz")


def _check_tiles(tiles, g, key):
    hashes = [hashlib.sha256(np.ascontiguousarray(t).tobytes()).hexdigest() for t in tiles]
    assert hashes == list(g[f"{key}/{HASH_KEY}"])
    # the stored means are Pillow 12's; Pillow 13 moves them by < 0.001 levels
    means = lambda a: a.reshape(len(a), -1, 3).astype(np.float64).mean(1)
    np.testing.assert_allclose(means(tiles), g[f"{key}/tile_mean_u8"], atol=1e-3)
    np.testing.assert_allclose(means(tiling.siglip_pixels(tiles)), g[f"{key}/pixel_mean"], atol=1e-5)


def test_siglip_lut_and_candidate_order():
    g = _load("dynamic_s2_tiling")
    np.testing.assert_array_equal(tiling.SIGLIP_LUT, g["siglip_lut"])
    assert tiling.candidate_grids(9, 12) == [tuple(r) for r in g["target_ratios_cols_rows"]]
    lite = _load("dynamic_tiling")
    assert tiling.candidate_grids(1, 12) == [tuple(r) for r in lite["target_ratios_cols_rows"]]


@pytest.mark.parametrize("w,h", CASES)
def test_dynamic_s2_tiling(w, h):
    g, key = _load("dynamic_s2_tiling"), f"c{w}x{h}"
    img = synthetic_image(w, h)
    assert hashlib.sha256(img.tobytes()).hexdigest() == str(g[f"{key}/input_sha256"])
    tiles, block = tiling.dynamic_s2_tiles(img)
    assert block == tuple(g[f"{key}/block_size_rows_cols"])
    assert len(tiles) == g[f"{key}/n_tiles"] == sum(F.tiles_per_scale((448, 896, 1344), block))
    _check_tiles(tiles, g, key)
    if key == "c448x448":
        np.testing.assert_array_equal(tiles, g[f"{key}/tiles_u8"])
        np.testing.assert_array_equal(tiling.siglip_pixels(tiles).transpose(0, 3, 1, 2), g[f"{key}/pixel_values"])


@pytest.mark.parametrize("w,h", CASES)
def test_lite_dynamic_tiling(w, h):
    g, key = _load("dynamic_tiling"), f"c{w}x{h}"
    tiles, grid = tiling.dynamic_tiles(synthetic_image(w, h))
    assert grid == tuple(g[f"{key}/grid_rows_cols"])
    assert len(tiles) == g[f"{key}/n_tiles"]
    assert (len(tiles) > grid[0] * grid[1]) == bool(g[f"{key}/has_thumbnail"])
    _check_tiles(tiles, g, key)


def test_area_interpolation_matrices_and_cases():
    g = _load("area_interpolate")
    for name in g.files:
        if name.startswith("matrix_"):
            n_in, n_out = map(int, name[len("matrix_"):].split("_to_"))
            np.testing.assert_allclose(F.area_matrix(n_in, n_out), g[name], atol=1e-7)
    cases = sorted({n.split("/")[0] for n in g.files if n.startswith("case")})
    assert len(cases) >= 8
    for c in cases:
        x = jnp.asarray(g[f"{c}/x"][0].transpose(1, 2, 0))  # [H, W, 1]
        y = F.area_resize(x, tuple(g[f"{c}/out_hw"]))
        np.testing.assert_allclose(np.asarray(y).transpose(2, 0, 1)[None], g[f"{c}/y"], atol=1e-6, err_msg=c)


@pytest.mark.parametrize("kind,folder", [("mlp_downsample", "nvila-tiny"),
                                         ("mlp_downsample_3x3_fix", "nvila-lite-tiny")])
def test_projectors(kind, folder):
    g = _load("projectors")
    proj = load_projector(GOLDEN / folder / "mm_projector")
    k = {"mlp_downsample": 2, "mlp_downsample_3x3_fix": 3}[kind]
    assert proj.merge == k and (proj.mid_fc is None) == (k == 2)
    x = jnp.asarray(g[f"{kind}/x"])
    np.testing.assert_array_equal(np.asarray(space_to_channel(x, 32, k)), g[f"{kind}/stc"])
    np.testing.assert_allclose(np.asarray(proj(x)), g[f"{kind}/y"], atol=1e-4)


def test_space_to_channel_odd_sizes():
    g = _load("projectors")
    x9, x10 = jnp.asarray(g["stc_odd/x_9x9"]), jnp.asarray(g["stc_odd/x_10x10"])
    np.testing.assert_array_equal(np.asarray(space_to_channel(x9, 9, 2)), g["stc_odd/flat_square_2x2"])
    np.testing.assert_array_equal(np.asarray(space_to_channel(x9, 9, 3)), g["stc_odd/flat_square_3x3"])
    np.testing.assert_array_equal(np.asarray(space_to_channel(x10, 10, 3)), g["stc_odd/flat_square_3x3_10x10"])


def test_scale_merge_and_encode_images():
    g = _load("scale_merge")
    proj = load_projector(GOLDEN / "nvila-tiny" / "mm_projector")
    block = tuple(int(v) for v in g["single/block_size_rows_cols"])
    feats = jnp.asarray(g["single/vit_features"])
    merged = F.merge_scales(feats, block)
    want = g["single/merged"][0].transpose(1, 2, 0)
    np.testing.assert_array_equal(np.asarray(merged[..., 16:]), want[..., 16:])
    np.testing.assert_allclose(np.asarray(merged), want, atol=1e-6)
    tiles = F.split_chessboard(merged, *block)
    np.testing.assert_array_equal(np.asarray(tiles), g["single/projector_in"])
    np.testing.assert_allclose(np.asarray(proj(tiles)), g["single/projector_out_per_tile"], atol=1e-4)
    out = F.encode_dynamic_s2(feats, block, proj)
    np.testing.assert_allclose(np.asarray(out), g["single/encode_images_out"][0], atol=1e-4)
    multi = F.encode_single_tile(jnp.asarray(g["multi/vit_features"]), proj, repeat=3)
    np.testing.assert_allclose(np.asarray(multi), g["multi/encode_images_out"], atol=1e-4)
    with pytest.raises(ValueError, match="expected 15 tiles"):
        F.merge_scales(feats[:14], block)
