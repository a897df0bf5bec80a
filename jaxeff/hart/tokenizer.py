"""HART hybrid tokenizer: VAR's multi-scale residual VQ-VAE plus the continuous residual.

Layout follows the CompVis vq-f16 autoencoder used by VAR/HART (NHWC here): encoder -> quant_conv -> multi-scale
residual quantizer with partially shared Phi convs -> post_quant_conv -> decoder. Encoder and decoder are the shared
VQGAN trunk (`jaxeff.nn.vqgan`, fused qkv attention); `jaxeff.hart.loading` renames its LlamaGen-style module paths
to VAR's keys (`down.N.block.M`, `mid.block_1`, decoder `up` reversed). The hybrid part is the residual
`f - sum(discrete scales)` at the last scale, which the decoder can take on top of the discrete sum.

Semantics mirror mit-han-lab/hart `HARTHybridQuantizer`:
- `quantize_train` (the VQ-VAE training forward) applies Phi on every scale and, unless the continuous part is
  skipped, adds the residual so the decoder sees the exact latent (straight-through on the discrete part).
- `encode_hybrid` (`f_to_idxBl_and_frest`) leaves the last scale without Phi and returns the residual *before*
  the last discrete scale is removed: the transformer's training target.
- `next_autoregressive_input` is the per-scale update used during generation.
Run on CPU only (tests, hart_tiny).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.hart.chunks import map_chunks
from jaxeff.nn.resample import resize
from jaxeff.nn.vqgan import Decoder, Encoder, conv


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 4096
    z_channels: int = 32  # Cvae
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    using_sa: bool = True
    using_mid_sa: bool = True
    norm_groups: int = 32
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    beta: float = 0.25
    # 1024px schedule of the released hart-0.7b-1024px tokenizer (14 scales, 9451 tokens, 64x64 latent).
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)

    def __post_init__(self):
        if len(self.patch_nums) < 2 or list(self.patch_nums) != sorted(set(self.patch_nums)):
            raise ValueError(f"patch_nums must be >= 2 strictly increasing sizes, got {self.patch_nums}")
        for c in {self.ch * m for m in self.ch_mult}:
            if c % self.norm_groups:
                raise ValueError(f"channel count {c} is not divisible by norm_groups={self.norm_groups}")
        if self.share_quant_resi < 1:
            raise ValueError("share_quant_resi must be >= 1 (number of shared Phi convs)")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    def phi_index(self, si: int) -> int:
        """Which of the `share_quant_resi` Phi convs scale `si` uses (nearest tick to si/(S-1))."""
        k = self.share_quant_resi
        ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
        return int(np.argmin(np.abs(ticks - si / (len(self.patch_nums) - 1))))


def _trunk(cfg: TokenizerConfig) -> dict:
    return dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks, z_channels=cfg.z_channels,
                groups=cfg.norm_groups, attn=cfg.using_sa, mid_attn=cfg.using_mid_sa, fused_qkv=True)


class Phi(nnx.Module):
    """h * (1 - r) + conv3x3(h) * r: the refinement applied after each upsampled scale."""

    def __init__(self, c: int, ratio: float, rngs: nnx.Rngs):
        self.conv = conv(c, c, 3, rngs)
        self.ratio = abs(ratio)

    def __call__(self, h):
        return h * (1 - self.ratio) + self.conv(h) * self.ratio


def _nearest_code(z, codebook):
    """argmin_v ||z - e_v||^2 for z [N, C], codebook [V, C]."""
    d = jnp.sum(z * z, -1, keepdims=True) + jnp.sum(codebook * codebook, -1) - 2 * z @ codebook.T
    return jnp.argmin(d, axis=-1)


class HybridQuantizer(nnx.Module):
    def __init__(self, cfg: TokenizerConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        v, c = cfg.vocab_size, cfg.z_channels
        self.embedding = nnx.Embed(v, c, embedding_init=nnx.initializers.uniform(2.0 / v), rngs=rngs)
        self.embedding.embedding[...] = self.embedding.embedding[...] - 1.0 / v  # U(-1/V, 1/V) like VAR's eini
        self.quant_resi = nnx.List([Phi(c, cfg.quant_resi, rngs) for _ in range(cfg.share_quant_resi)])

    @property
    def codebook(self):
        return self.embedding.embedding[...]

    def phi(self, si: int, h):
        return self.quant_resi[self.cfg.phi_index(si)](h)

    def lookup(self, idx, pn: int):
        """[B, pn*pn] indices -> [B, pn, pn, C] code vectors."""
        return self.codebook[idx].reshape(idx.shape[0], pn, pn, -1)

    def quantize_train(self, f, skip_continuous):
        """VQ-VAE training forward. f: [B, H, W, C]; skip_continuous: bool scalar (drop the residual).

        Returns (f_hat for the decoder with straight-through gradients, vq_loss, list of index maps)."""
        pns = self.cfg.patch_nums
        hw, sn = f.shape[1], len(pns)
        f_ng = jax.lax.stop_gradient(f)
        f_rest, f_hat = f_ng, jnp.zeros_like(f)
        vq_loss, idx_list = 0.0, []
        for si, pn in enumerate(pns):
            z = resize(f_rest, pn, "area").reshape(-1, f.shape[-1])
            idx = _nearest_code(z, jax.lax.stop_gradient(self.codebook)).reshape(f.shape[0], pn * pn)
            idx_list.append(idx)
            h = self.phi(si, resize(self.lookup(idx, pn), hw, "bicubic"))
            f_hat = f_hat + h
            f_rest = f_rest - h
            vq_loss = vq_loss + self.cfg.beta * jnp.mean((jax.lax.stop_gradient(f_hat) - f) ** 2)
            vq_loss = vq_loss + jnp.mean((f_hat - f_ng) ** 2)
        f_hat = f_hat + jnp.where(skip_continuous, 0.0, 1.0) * f_rest
        # straight-through: forward value f_hat, gradient to the encoder as if identity
        return jax.lax.stop_gradient(f_hat - f) + f, vq_loss / sn, idx_list

    def encode_hybrid(self, f):
        """Returns (idx list per scale, residual [B, H, W, C] before the last discrete scale is removed,
        discrete f_hat [B, H, W, C] incl. the last scale). latent == f_hat + (residual - last-scale codes)."""
        pns = self.cfg.patch_nums
        hw, sn = f.shape[1], len(pns)
        if hw != pns[-1]:
            raise ValueError(f"latent is {hw}x{hw} but the last scale is {pns[-1]}")
        f_rest, f_hat, idx_list = f, jnp.zeros_like(f), []
        for si, pn in enumerate(pns):
            z = resize(f_rest, pn, "area").reshape(-1, f.shape[-1])
            idx = _nearest_code(z, self.codebook).reshape(f.shape[0], pn * pn)
            h = resize(self.lookup(idx, pn), hw, "bicubic")
            if si != sn - 1:  # the last discrete scale has no Phi (matches inference)
                h = self.phi(si, h)
            else:
                resid = f_rest
            f_hat = f_hat + h
            f_rest = f_rest - h
            idx_list.append(idx)
        return idx_list, resid, f_hat

    def idx_to_fhat(self, idx_list, last_phi: bool = False):
        """Sum of the upsampled (and Phi-refined) code maps. `last_phi` adds Phi on the last scale too (VAR)."""
        pns = self.cfg.patch_nums
        hw, sn = pns[-1], len(pns)
        f_hat = 0.0
        for si, (pn, idx) in enumerate(zip(pns, idx_list, strict=True)):
            h = resize(self.lookup(idx, pn), hw, "bicubic")
            if si != sn - 1 or last_phi:
                h = self.phi(si, h)
            f_hat = f_hat + h
        return f_hat

    def next_autoregressive_input(self, si: int, f_hat, h):
        """Generation update after scale `si` produced code vectors h [B, pn, pn, C]: returns (f_hat, next input)."""
        pns = self.cfg.patch_nums
        if si == len(pns) - 1:
            f_hat = f_hat + h
            return f_hat, f_hat
        f_hat = f_hat + self.phi(si, resize(h, pns[-1], "bicubic"))
        return f_hat, resize(f_hat, pns[si + 1], "area")

    def teacher_forcing_input(self, idx_list):
        """Inputs of scales 1..S-1 for the transformer: area-downsampled running f_hat, [B, L - 1, C]."""
        pns = self.cfg.patch_nums
        b = idx_list[0].shape[0]
        f_hat = jnp.zeros((b, pns[-1], pns[-1], self.cfg.z_channels), self.codebook.dtype)
        out = []
        for si in range(len(pns) - 1):
            f_hat = f_hat + self.phi(si, resize(self.lookup(idx_list[si], pns[si]), pns[-1], "bicubic"))
            nxt = resize(f_hat, pns[si + 1], "area")
            out.append(nxt.reshape(b, -1, self.cfg.z_channels))
        return jnp.concatenate(out, axis=1)


class HARTTokenizer(nnx.Module):
    """Encoder + hybrid quantizer + decoder (the `vae` of the released tokenizer).

    `dtype` / `param_dtype`: compute and weight dtype of the convolutional autoencoder (encoder, decoder,
    quant_conv, post_quant_conv; `jaxeff.nn.vqgan`: GroupNorm statistics and the attention softmax stay float32).
    The quantizer (codebook, Phi convs) stays float32: its sums are the transformer's inputs and the residual
    target. `encode` and `decode` return float32. Default float32 (the golden tests' mode); the official sampler
    runs the decoder under fp16 autocast (`sample.py`)."""

    def __init__(self, cfg: TokenizerConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.cfg = cfg
        k = cfg.quant_conv_ks
        dt = {"dtype": dtype, "param_dtype": param_dtype}
        self.encoder = Encoder(**_trunk(cfg), rngs=rngs, **dt)
        self.decoder = Decoder(**_trunk(cfg), rngs=rngs, **dt)
        self.quant_conv = conv(cfg.z_channels, cfg.z_channels, k, rngs, **dt)
        self.post_quant_conv = conv(cfg.z_channels, cfg.z_channels, k, rngs, **dt)
        self.quantize = HybridQuantizer(cfg, rngs)

    def encode(self, img):
        """img [B, H, W, 3] in [-1, 1] -> latent f [B, h, w, Cvae] float32."""
        if img.shape[1] != self.cfg.image_size or img.shape[2] != self.cfg.image_size:
            raise ValueError(f"image is {img.shape[1]}x{img.shape[2]}, tokenizer expects {self.cfg.image_size}")
        return self.quant_conv(self.encoder(img)).astype(jnp.float32)

    def _decode(self, f_hat):
        return self.decoder(self.post_quant_conv(f_hat)).astype(jnp.float32)

    def decode(self, f_hat, chunk: int | None = None):
        """latent [B, h, w, Cvae] -> image [B, H, W, 3] float32 clamped to [-1, 1]. `chunk`: decode at most this
        many images at a time (`jaxeff.hart.chunks.map_chunks`): the full-resolution activations (about 2 GB per
        1024px image in float32 in XLA's memory analysis) are then held for `chunk` images, not B; None: all at
        once."""
        return map_chunks(lambda f: jnp.clip(self._decode(f), -1.0, 1.0), (f_hat,), chunk)

    def __call__(self, img, skip_continuous):
        """Training forward: (reconstruction float32, vq_loss)."""
        f_hat, vq_loss, _ = self.quantize.quantize_train(self.encode(img), skip_continuous)
        return self._decode(f_hat), vq_loss
