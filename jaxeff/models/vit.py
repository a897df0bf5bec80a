"""A SigLIP-style Vision Transformer encoder in Flax NNX (no CLS token, learned position embeddings, pre-LN).

Module names follow Hugging Face `SiglipVisionModel` (`embeddings.patch_embedding`, `embeddings.position_embedding`,
`encoder.layers[i].{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.{fc1,fc2}}`, `post_layernorm`) so a
SigLIP checkpoint maps onto it key by key (a torch Conv2d weight [out, in, kh, kw] is our kernel [kh, kw, in, out]).
Images are NHWC. Run on CPU only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.nn import attention


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by heads {self.num_attention_heads}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


class ViTEmbeddings(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        p = cfg.patch_size
        self.patch_embedding = nnx.Conv(cfg.num_channels, cfg.hidden_size, kernel_size=(p, p), strides=(p, p),
                                        padding="VALID", dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.num_patches, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                            embedding_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)

    def __call__(self, pixels):
        x = self.patch_embedding(pixels)  # [N, g, g, hidden]
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return x + self.position_embedding.embedding[...][None].astype(x.dtype)


class ViTAttention(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads = cfg.num_attention_heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=nnx.initializers.normal(cfg.initializer_range),
                  rngs=rngs)
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nnx.Linear(d, d, **kw) for _ in range(4))

    def __call__(self, x):
        n, t, d = x.shape
        heads = lambda y: y.reshape(n, t, self.num_heads, d // self.num_heads)
        a = attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), causal=False)
        return self.out_proj(a.reshape(n, t, d))


class ViTMLP(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=nnx.initializers.normal(cfg.initializer_range),
                  rngs=rngs)
        self.fc1 = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.fc2 = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))  # SigLIP's gelu_pytorch_tanh


class ViTLayer(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, **kw)
        self.self_attn = ViTAttention(cfg, **kw)
        self.layer_norm2 = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, **kw)
        self.mlp = ViTMLP(cfg, **kw)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ViTEncoder(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([ViTLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])


class ViT(nnx.Module):
    """`vit(pixels [N, H, W, C])` -> patch features [N, num_patches, hidden].

    `select_layer=None` returns the post-LayerNorm output of the last layer; an int picks Hugging Face's
    `hidden_states[select_layer]` instead (0 = embeddings, -1 = last layer before `post_layernorm`; VILA/NVILA
    use -2). Layers after the selected one are not run.
    """

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = ViTEmbeddings(cfg, **kw)
        self.encoder = ViTEncoder(cfg, **kw)
        self.post_layernorm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, **kw)

    def __call__(self, pixels, *, select_layer: int | None = None):
        cfg = self.config
        if pixels.ndim != 4 or pixels.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(f"pixels must be [N, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}], "
                             f"got {pixels.shape}")
        n_layers = cfg.num_hidden_layers
        if select_layer is None:
            stop = n_layers
        else:
            stop = select_layer % (n_layers + 1)
            if not -(n_layers + 1) <= select_layer <= n_layers:
                raise ValueError(f"select_layer {select_layer} out of range for {n_layers} layers")
        x = self.embeddings(pixels)
        for layer in list(self.encoder.layers)[:stop]:
            x = layer(x)
        return self.post_layernorm(x) if select_layer is None else x


# ----------------------------------------------------------------------------------------------------------------
# Vision-language connector pieces (VILA / NVILA style): spatial then temporal token compression.


def space_to_channel(x, grid: int, merge: int):
    """[N, grid*grid, C] -> [N, (grid/merge)^2, merge*merge*C]: each merge x merge patch square becomes one token
    (row-major over squares; channels ordered (row in square, column in square, C)). Zero-pads the grid up to a
    multiple of `merge`."""
    n, t, c = x.shape
    if t != grid * grid:
        raise ValueError(f"expected {grid * grid} tokens for a {grid}x{grid} grid, got {t}")
    g = -(-grid // merge) * merge
    x = x.reshape(n, grid, grid, c)
    if g != grid:
        x = jnp.pad(x, ((0, 0), (0, g - grid), (0, g - grid), (0, 0)))
    x = x.reshape(n, g // merge, merge, g // merge, merge, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (g // merge) ** 2, merge * merge * c)


class DownsampleProjector(nnx.Module):
    """VILA's space-to-channel projectors (NVlabs/VILA `llava/model/multimodal_projector/base_projector.py:145-174`
    at b760c34): merge x merge space-to-channel -> LayerNorm -> Linear -> GELU [-> LayerNorm -> Linear -> GELU]
    -> Linear. Without `mid_dim` (the bracket left out) it is `mlp_downsample` (2x2); with merge 3 and
    `mid_dim` = 3 x vision_dim it is `mlp_downsample_3x3_fix` (NVILA-Lite). torch's defaults there: LayerNorm eps
    1e-5, exact (erf) GELU.

    x [N, grid*grid, vision_dim] -> [N, ceil(grid/merge)^2, llm_dim]. Module names `norm`, `fc1`, [`mid_norm`,
    `mid_fc`], `fc2` in call order; `jaxeff.nvila.projector` maps them to the official `layers.N` keys.
    """

    def __init__(self, vision_dim: int, llm_dim: int, grid: int, merge: int = 2, *, rngs: nnx.Rngs,
                 mid_dim: int | None = None, dtype=jnp.float32, param_dtype=jnp.float32, init_std: float = 0.02,
                 epsilon: float = 1e-5):
        self.grid, self.merge = grid, merge
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        init = nnx.initializers.normal(init_std)
        cin = merge * merge * vision_dim
        self.norm = nnx.LayerNorm(cin, epsilon=epsilon, **kw)
        self.fc1 = nnx.Linear(cin, mid_dim or llm_dim, kernel_init=init, **kw)
        if mid_dim:
            self.mid_norm = nnx.LayerNorm(mid_dim, epsilon=epsilon, **kw)
            self.mid_fc = nnx.Linear(mid_dim, llm_dim, kernel_init=init, **kw)
        else:
            self.mid_norm = self.mid_fc = None
        self.fc2 = nnx.Linear(llm_dim, llm_dim, kernel_init=init, **kw)

    @property
    def tokens_out(self) -> int:
        return (-(-self.grid // self.merge)) ** 2

    def __call__(self, x):
        x = space_to_channel(x, self.grid, self.merge)
        x = jax.nn.gelu(self.fc1(self.norm(x)), approximate=False)
        if self.mid_fc is not None:
            x = jax.nn.gelu(self.mid_fc(self.mid_norm(x)), approximate=False)
        return self.fc2(x)


def temporal_pool(x, frame_mask, pool: int):
    """Average groups of `pool` consecutive frames: x [B, F, T, D], frame_mask [B, F] (True = real frame) ->
    (pooled [B, ceil(F/pool), T, D], group_mask [B, ceil(F/pool)]). Padded frames are left out of the mean, so a
    short last group averages only its real frames."""
    b, f, t, d = x.shape
    groups = -(-f // pool)
    pad = groups * pool - f
    w = jnp.pad(frame_mask.astype(x.dtype), ((0, 0), (0, pad))).reshape(b, groups, pool)
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, groups, pool, t, d)
    count = w.sum(-1)
    pooled = jnp.einsum("bgptd,bgp->bgtd", x, w) / jnp.maximum(count, 1)[:, :, None, None]
    return pooled, count > 0
