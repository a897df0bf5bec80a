"""DC-AE reconstruction metrics as the official evaluator computes them: uint8 quantization, PSNR, torchmetrics'
SSIM (against a direct float64 numpy implementation of its formula, and torchmetrics itself when installed) and
LPIPS (against torchmetrics' `_LPIPS` network code with the released heads and random backbones)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.dcae import metrics
from jaxeff.dcae.perceptual import CHANNELS, load_lpips_weights, lpips
from jaxeff.io.safetensors import save_file


def _pair(rng, shape=(3, 40, 37, 3), noise=20):
    """uint8 image pairs and their [-1, 1] float versions (which quantize back to exactly these uint8 values)."""
    a = rng.integers(0, 256, shape).astype(np.uint8)
    b = np.clip(a.astype(np.int32) + rng.integers(-noise, noise + 1, shape), 0, 255).astype(np.uint8)
    return a, b, a.astype(np.float32) / 127.5 - 1, b.astype(np.float32) / 127.5 - 1


def test_dcae_quantization_and_psnr_as_the_evaluator():
    x = np.array([-1.5, -1.0, -0.5, 0.0, 0.001, 0.5, 0.999, 1.0, 2.0], np.float32)
    # evaluator: (255 * ((x + 1) / 2) + 0.5).clamp(0, 255).to(torch.uint8), i.e. +0.5 then truncation
    want = np.floor(np.clip(255 * ((x.astype(np.float64) + 1) / 2) + 0.5, 0, 255)).astype(np.uint8)
    assert np.array_equal(np.asarray(metrics.quantize_uint8(jnp.asarray(x))), want)
    # an exact half: 255 * (x + 1) / 2 = 0.5 -> 1 here, where np.round (half to even) gives 0
    assert int(metrics.quantize_uint8(jnp.float32(1 / 255 - 1))) == 1
    rng = np.random.default_rng(0)
    a, b, xa, xb = _pair(rng)
    mse = ((a.astype(np.float64) - b) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(metrics.psnr(jnp.asarray(xb), jnp.asarray(xa)), 10 * np.log10(255**2 / mse),
                               rtol=1e-5)
    assert np.isinf(metrics.psnr(jnp.asarray(xa), jnp.asarray(xa))).all()


def _ssim_numpy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """torchmetrics' (>= 1.4.2) SSIM written out in float64: reflect-pad by 5, 11x11 Gaussian (sigma 1.5) per
    channel, mean of the map over C, H, W. [B, H, W, C] 0..255 -> [B]."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    d = np.arange(-5, 6, dtype=np.float64)
    g = np.exp(-((d / 1.5) ** 2) / 2)
    g /= g.sum()
    k = np.outer(g, g)

    def blur(x):
        xp = np.pad(x, ((0, 0), (5, 5), (5, 5), (0, 0)), mode="reflect")
        h, w = x.shape[1:3]
        out = np.zeros_like(x)
        for i in range(11):
            for j in range(11):
                out += k[i, j] * xp[:, i : i + h, j : j + w]
        return out

    mu_a, mu_b = blur(a), blur(b)
    var_a = np.maximum(blur(a * a) - mu_a**2, 0)
    var_b = np.maximum(blur(b * b) - mu_b**2, 0)
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(axis=(1, 2, 3))


def test_dcae_ssim_is_torchmetrics_formula():
    rng = np.random.default_rng(1)
    a, b, xa, xb = _pair(rng)
    ours = np.asarray(metrics.ssim(jnp.asarray(xb), jnp.asarray(xa)))
    np.testing.assert_allclose(ours, _ssim_numpy(b, a), rtol=2e-5, atol=2e-6)
    assert ours.shape == (3,) and np.all(ours < 1) and np.all(ours > 0.5)
    # not scikit-image's default (7x7 uniform window): on a noisy photo crop the two differ by ~0.06
    import skimage.data
    from skimage.metrics import structural_similarity

    a = skimage.data.astronaut()[100:164, 200:264]
    b = np.clip(a.astype(np.int32) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    ours = float(metrics.ssim_uint8(jnp.asarray(b[None]), jnp.asarray(a[None]))[0])
    np.testing.assert_allclose(ours, _ssim_numpy(b[None], a[None])[0], rtol=2e-5)
    assert abs(structural_similarity(b, a, channel_axis=-1, data_range=255) - ours) > 0.02
    with pytest.raises(ValueError, match="larger than 5x5"):
        metrics.ssim(jnp.zeros((1, 5, 32, 3)), jnp.zeros((1, 5, 32, 3)))


def test_dcae_ssim_psnr_match_torchmetrics():
    torch = pytest.importorskip("torch")
    tm = pytest.importorskip("torchmetrics.image")
    rng = np.random.default_rng(2)
    a, b, xa, xb = _pair(rng, (4, 48, 33, 3), noise=40)
    ssim = tm.StructuralSimilarityIndexMeasure(data_range=(0.0, 255.0))  # as efficientvit/aecore/evaluator.py
    ta, tb = (torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2))) for v in (a, b))
    ssim.update(ta, tb)  # the evaluator passes the uint8 tensors (reference first)
    got = metrics.reconstruction_metrics(xb, xa, batch=3)  # two batches: the mean is over images
    np.testing.assert_allclose(got["SSIM"], float(ssim.compute()), rtol=1e-5)
    mse = (ta.float() - tb.float()).square().mean(dim=(1, 2, 3))  # efficientvit apps/metrics/psnr/psnr.py
    np.testing.assert_allclose(got["PSNR"], float((10 * torch.log10(255.0**2 / mse)).mean()), rtol=1e-5)
    assert set(got) == {"PSNR", "SSIM"}
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.reconstruction_metrics(xb[:2], xa)


def _torchvision_features(net: str):
    """torchvision's alexnet / vgg16 `features` layer layout (torch default init), built without torchvision."""
    from torch import nn

    if net == "alex":
        return nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(),
            nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
    layers, cin = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
            cin = v
    return nn.Sequential(*layers)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_dcae_lpips_matches_torchmetrics(net, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    tl = pytest.importorskip("torchmetrics.functional.image.lpips")
    # the ImageNet backbones are a torchvision download: random ones here; the heads are the released ones that
    # ship in the torchmetrics wheel (pretrained=True loads them)
    monkeypatch.setattr(tl, "_get_tv_model_features", lambda name, pretrained=False: _torchvision_features(net))
    torch.manual_seed(0)
    ref_net = tl._LPIPS(pretrained=True, net=net, pnet_rand=True).eval()
    save_file({k: v.detach().numpy().copy() for k, v in ref_net.state_dict().items()}, tmp_path / "w.safetensors")
    w = load_lpips_weights(tmp_path / "w.safetensors", net=net)
    rng = np.random.default_rng(3)
    a, b, xa, xb = _pair(rng, (2, 64, 64, 3), noise=60)
    with torch.no_grad():  # the evaluator: LearnedPerceptualImagePatchSimilarity(normalize=True) on uint8 / 255
        ta, tb = (torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2))) / 255 for v in (a, b))
        ref = ref_net(ta, tb, normalize=True).flatten().numpy()
    got = np.asarray(jax.jit(metrics.lpips)(w, jnp.asarray(xa), jnp.asarray(xb)))
    np.testing.assert_allclose(got, ref, rtol=2e-4)
    assert np.all(ref > 0)
    if net == "alex":
        full = metrics.reconstruction_metrics(xb, xa, w)
        np.testing.assert_allclose(full["LPIPS"], ref.mean(), rtol=2e-4)


def random_lpips_vgg_tensors(rng) -> dict[str, np.ndarray]:
    """A random LPIPS-VGG16 state in the torchvision `features.<i>` layout (for tests that need a loadable file)."""
    tensors, cin = {}, 3
    indices = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
    for k, stage in enumerate(indices):
        for i in stage:
            c = CHANNELS["vgg"][k]
            tensors[f"features.{i}.weight"] = (rng.standard_normal((c, cin, 3, 3)) / np.sqrt(9 * cin)).astype(
                np.float32)
            tensors[f"features.{i}.bias"] = np.zeros(c, np.float32)
            cin = c
        tensors[f"lin{k}.model.1.weight"] = rng.uniform(0, 1, (1, CHANNELS["vgg"][k], 1, 1)).astype(np.float32)
    return tensors


def test_dcae_lpips_weights_file_checks(tmp_path):
    """Without torch: a random LPIPS-VGG file in the torchvision `features.<i>` layout loads and behaves."""
    rng = np.random.default_rng(4)
    tensors = random_lpips_vgg_tensors(rng)
    save_file(tensors, tmp_path / "vgg.safetensors")
    w = load_lpips_weights(tmp_path / "vgg.safetensors", net="vgg")
    x = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    d = jax.jit(lpips)
    np.testing.assert_allclose(d(w, x, x), 0.0, atol=1e-7)
    far, near = d(w, x, -x), d(w, x, x + 0.05)
    assert np.all(far > near) and np.all(near > 0)
    with pytest.raises(ValueError, match="not an LPIPS-alex weights file"):
        load_lpips_weights(tmp_path / "vgg.safetensors", net="alex")
    with pytest.raises(ValueError, match="unknown LPIPS backbone"):
        load_lpips_weights(tmp_path / "vgg.safetensors", net="squeeze")
    del tensors["lin4.model.1.weight"]
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="lin4.model.1.weight"):
        load_lpips_weights(tmp_path / "bad.safetensors", net="vgg")
