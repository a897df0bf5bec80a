"""DC-AE parity with diffusers' PyTorch `AutoencoderDC` (random weights, small configs) and checkpoint loading."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.dcae import DCAE, DCAEConfig, get_config, jit_method, original_to_diffusers
from jaxeff.io.safetensors import save_file

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# ResBlock + EfficientViT stages with BatchNorm in the decoder (the f32/f64/f128 pattern); at 32px the stage at 8x8
# runs linear attention (64 tokens > head dim 16) and the one at 4x4 the quadratic path (16 tokens).
CFG_EVIT = DCAEConfig(
    latent_channels=8,
    attention_head_dim=16,
    encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(8, 16, 32, 32),
    decoder_block_out_channels=(8, 16, 32, 32),
    encoder_layers_per_block=(0, 1, 1, 1),
    decoder_layers_per_block=(0, 1, 2, 1),
    encoder_qkv_multiscales=((),) * 4,
    decoder_qkv_multiscales=((),) * 4,
    decoder_norm_types=("batch_norm", "batch_norm", "rms_norm", "rms_norm"),
    decoder_act_fns=("relu", "relu", "silu", "silu"),
    scaling_factor=0.5,
)
# The sana pattern: multi-scale aggregation, stride-2 conv down-sampling, nearest + conv up-sampling, RMSNorm.
CFG_SANA = dataclasses.replace(
    CFG_EVIT,
    encoder_layers_per_block=(1, 1, 1, 1),
    decoder_layers_per_block=(1, 1, 1, 2),
    encoder_qkv_multiscales=((), (), (5,), (5,)),
    decoder_qkv_multiscales=((), (), (5,), (5,)),
    downsample_block_type="conv",
    upsample_block_type="interpolate",
    decoder_norm_types=("rms_norm",) * 4,
    decoder_act_fns=("silu",) * 4,
)
CONFIGS = {"evit_bn": CFG_EVIT, "sana": CFG_SANA}


def torch_model(cfg: DCAEConfig, seed: int = 0):
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    model = diffusers.AutoencoderDC(**kwargs).eval()
    # default norms are identity-like; randomize them (and BN statistics) so every tensor matters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand_like(b))
    return model


def torch_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(config, torch model, jaxeff model loaded from the torch model's diffusers save_pretrained directory)."""
    cfg = CONFIGS[request.param]
    tm = torch_model(cfg)
    directory = tmp_path_factory.mktemp(request.param)
    tm.save_pretrained(directory)
    return cfg, tm, DCAE.from_pretrained(directory)


def test_dcae_parity_with_diffusers(pair):
    cfg, tm, jm = pair
    assert jm.config == cfg
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref_z = tm.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent.permute(0, 2, 3, 1).numpy()
        latents = rng.standard_normal(ref_z.shape).astype(np.float32)
        ref_x = tm.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    z = jit_method(jm, "encode")(jnp.asarray(images))
    x = jit_method(jm, "decode")(jnp.asarray(latents))
    assert z.shape == ref_z.shape == (2, 4, 4, 8)
    assert x.shape == ref_x.shape == (2, 32, 32, 3)
    assert rel_err(z, ref_z) < 1e-4
    assert rel_err(x, ref_x) < 1e-4
    # latent scaling: z * sf on encode, / sf on decode
    zs = jit_method(jm, "encode", scaled=True)(jnp.asarray(images))
    np.testing.assert_allclose(zs, np.asarray(z) * cfg.scaling_factor, rtol=1e-5, atol=1e-6)


def test_dcae_batchnorm_training_mode_matches_torch(tmp_path):
    """bn2d decoder stages in training mode as torch.nn.BatchNorm2d.train(): batch statistics, running averages
    updated with momentum 0.1 and the unbiased variance; eval mode then uses the updated running statistics."""
    cfg = dataclasses.replace(CFG_EVIT, decoder_layers_per_block=(1, 2, 2, 1))  # three bn2d ResBlocks
    tm = torch_model(cfg, seed=2)
    tm.save_pretrained(tmp_path)
    jm = DCAE.from_pretrained(tmp_path)
    images = np.random.default_rng(1).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    xt = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref_train = tm.train()(xt).sample.permute(0, 2, 3, 1).numpy()
        ref_eval = tm.eval()(xt).sample.permute(0, 2, 3, 1).numpy()
    buffers = {k: v.numpy() for k, v in tm.named_buffers() if k.endswith(("running_mean", "running_var"))}

    graphdef, state = nnx.split(jm)

    @jax.jit
    def train_forward(state, x):
        model = nnx.merge(graphdef, state)
        model.train()
        return model(x), nnx.state(model, nnx.BatchStat)

    y, stats = train_forward(state, jnp.asarray(images))
    assert rel_err(y, ref_train) < 1e-4
    assert rel_err(ref_train, ref_eval) > 1e-2  # the two modes really differ here
    flat = {".".join(map(str, path)): np.asarray(v[...]) for path, v in nnx.to_flat_state(stats)}
    assert set(flat) == set(buffers) and len(buffers) == 2 * 3
    for key, ref in buffers.items():
        np.testing.assert_allclose(flat[key], ref, rtol=1e-4, atol=1e-5, err_msg=key)
    nnx.update(jm, stats)
    assert rel_err(jit_method(jm, "__call__")(jnp.asarray(images)), ref_eval) < 1e-4


def _original_key(key: str, cfg: DCAEConfig) -> str:
    """diffusers key -> efficientvit key (inverse of the conversion; checked against diffusers' converter below)."""
    side, rest = key.split(".", 1)
    if rest.startswith("conv_in."):
        if side == "decoder":
            return "decoder.project_in.main.conv." + rest.removeprefix("conv_in.")
        return "encoder.project_in.conv." + rest.removeprefix("conv_in.")
    if rest.startswith("conv_out."):
        inner = rest.removeprefix("conv_out.")
        if side == "encoder":
            return "encoder.project_out.main.op_list.0.conv." + inner
        return "decoder.project_out.op_list.2.conv." + inner
    if rest.startswith("norm_out."):
        return "decoder.project_out.op_list.0." + rest.removeprefix("norm_out.")
    _, stage, idx, inner = rest.split(".", 3)
    prefix = f"{side}.stages.{stage}.op_list.{idx}."
    attn_map = {
        "attn.to_qkv.": "context_module.main.qkv.conv.",
        "attn.to_out.": "context_module.main.proj.conv.",
        "attn.norm_out.": "context_module.main.proj.norm.",
        "conv_out.norm.": "local_module.main.point_conv.norm.",
        "conv_out.conv_inverted.": "local_module.main.inverted_conv.conv.",
        "conv_out.conv_depth.": "local_module.main.depth_conv.conv.",
        "conv_out.conv_point.": "local_module.main.point_conv.conv.",
        "conv1.": "main.conv1.conv.",
        "conv2.": "main.conv2.conv.",
        "norm.": "main.conv2.norm.",
    }
    for src, dst in attn_map.items():
        if inner.startswith(src):
            return prefix + dst + inner.removeprefix(src)
    if inner.startswith("attn.to_qkv_multiscale."):
        s, which, leaf = inner.removeprefix("attn.to_qkv_multiscale.").split(".")
        return prefix + f"context_module.main.aggreg.{s}.{0 if which == 'proj_in' else 1}.{leaf}"
    assert inner.startswith("conv."), key
    stride_conv = side == "encoder" and cfg.downsample_block_type == "conv"
    return prefix + ("main.conv." if stride_conv else "main.conv.conv.") + inner.removeprefix("conv.")


def to_original(sd: dict[str, np.ndarray], cfg: DCAEConfig) -> dict[str, np.ndarray]:
    out = {}
    for key, value in sd.items():
        if key.endswith(("attn.to_k.weight", "attn.to_v.weight")):
            continue
        if key.endswith("attn.to_q.weight"):
            parent = key.removesuffix(".to_q.weight")
            qkv = np.concatenate([sd[f"{parent}.to_{n}.weight"] for n in "qkv"])
            out[_original_key(parent + ".to_qkv.weight", cfg)] = qkv[:, :, None, None]
        elif key.endswith("attn.to_out.weight"):
            out[_original_key(key, cfg)] = value[:, :, None, None]
        else:
            out[_original_key(key, cfg)] = value
    return out


def test_dcae_loads_original_format(pair, tmp_path):
    cfg, tm, jm = pair
    sd = torch_state_dict(tm)
    original = to_original(sd, cfg)
    # the layout we write is the one diffusers' own single-file converter understands
    from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers

    converted = convert_autoencoder_dc_checkpoint_to_diffusers({k: torch.from_numpy(v) for k, v in original.items()})
    assert set(converted) == set(sd)
    assert all(np.array_equal(converted[k].numpy(), sd[k]) for k in sd)
    mine = original_to_diffusers(original)
    assert set(mine) == set(sd) and all(np.array_equal(mine[k], sd[k]) for k in sd)

    save_file(original, tmp_path / "model.safetensors")
    loaded = DCAE.from_pretrained(tmp_path, config=cfg)
    _, a = nnx.split(loaded)
    _, b = nnx.split(jm)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))


def test_dcae_loader_errors(tmp_path):
    cfg = CFG_SANA
    sd = torch_state_dict(torch_model(cfg, seed=1))
    bad = dict(sd)
    del bad["decoder.conv_in.bias"]
    bad["encoder.extra.weight"] = np.zeros(3, np.float32)
    bad["encoder.conv_out.weight"] = np.zeros((8, 16, 3, 3), np.float32)
    save_file(bad, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_diffusers()))
    with pytest.raises(ValueError) as e:
        DCAE.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing keys: ['decoder.conv_in.bias']" in msg and "unexpected keys: ['encoder.extra.weight']" in msg
    assert ("encoder.conv_out.weight: checkpoint (8, 16, 3, 3) = (3, 3, 16, 8) in our layout vs model (3, 3, 32, 8)"
            in msg)
    # original-format weights without any way to know the architecture
    save_file(to_original(sd, cfg), tmp_path / "orig.safetensors")
    with pytest.raises(ValueError, match="carry no architecture"):
        DCAE.from_pretrained(tmp_path / "orig.safetensors")
    with pytest.raises(FileNotFoundError, match="huggingface.co"):
        DCAE.from_pretrained(tmp_path / "nope")


def test_dcae_released_configs():
    for name, n_stages, latent in [("dc-ae-f32c32-in-1.0", 6, 32), ("dc-ae-f64c128-mix-1.0", 7, 128),
                                   ("mit-han-lab/dc-ae-f128c512-in-1.0-diffusers", 8, 512),
                                   ("dc-ae-f32c32-sana-1.1", 6, 32)]:
        cfg = get_config(name)
        assert len(cfg.encoder_block_out_channels) == n_stages and cfg.latent_channels == latent
        assert DCAEConfig.from_diffusers(cfg.to_diffusers()) == cfg
    # the full f32c32 parameter count, built abstractly (no memory)
    model = nnx.eval_shape(lambda: DCAE(get_config("dc-ae-f32c32-in-1.0"), rngs=nnx.Rngs(0)))
    def count(m):
        return sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(m, nnx.Param)))

    # reference notes (from the diffusers implementation): 123.2M encoder, 200.2M decoder
    assert abs(count(model.encoder) - 123.2e6) < 0.1e6 and abs(count(model.decoder) - 200.2e6) < 0.1e6
    with pytest.raises(ValueError, match="unknown DC-AE config"):
        get_config("dc-ae-f16c4")
    with pytest.raises(ValueError, match="middle stage without blocks"):
        dataclasses.replace(CFG_SANA, encoder_layers_per_block=(1, 0, 1, 1))
    with pytest.raises(ValueError, match="multiple of the compression factor"):
        nnx.eval_shape(lambda: DCAE(CFG_SANA, rngs=nnx.Rngs(0))).encode(jnp.zeros((1, 20, 20, 3)))


def test_dcae_conv_paths_match_direct_conv():
    """The CPU conv rewrites (Winograd F(4x4,3x3), shifted-sum depthwise) against XLA's direct convolution."""
    from jaxeff.dcae.model import Conv2d, _winograd_pays, winograd_conv3x3
    from jaxeff.nn import depthwise_conv_shifted

    rng = np.random.default_rng(0)

    def direct(x, w, groups=1):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=groups)

    # odd sizes: H, W not multiples of the 4x4 output tile, batch 2, cin != cout
    x = jnp.asarray(rng.standard_normal((2, 13, 10, 5)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 5, 7)) / np.sqrt(45), jnp.float32)
    assert rel_err(jax.jit(winograd_conv3x3)(x, w), direct(x, w)) < 2e-5
    for k in (3, 5):
        wd = jnp.asarray(rng.standard_normal((k, k, 1, 5)), jnp.float32)
        assert rel_err(jax.jit(depthwise_conv_shifted)(x, wd), direct(x, wd, groups=5)) < 1e-5
    # the module dispatches to Winograd at the encoder's 128px shapes; compare that path with torch's conv
    conv = Conv2d(256, 256, 3, rngs=nnx.Rngs(0))
    xb = jnp.asarray(rng.standard_normal((1, 128, 128, 256)), jnp.float32)
    assert _winograd_pays(xb, conv.weight[...]) and not _winograd_pays(xb[:, :64], conv.weight[...])
    ref = torch.nn.functional.conv2d(torch.tensor(np.asarray(xb)).permute(0, 3, 1, 2),
                                     torch.tensor(np.asarray(conv.weight[...]).transpose(3, 2, 0, 1)),
                                     torch.tensor(np.asarray(conv.bias[...])), padding=1)
    assert rel_err(jax.jit(lambda x: conv(x))(xb), ref.permute(0, 2, 3, 1).numpy()) < 2e-5
