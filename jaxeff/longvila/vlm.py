"""A tiny video VLM and its MM-SP (multi-modal sequence parallel) training/eval loss.

Model: ViT on every frame -> 2x2 space-to-channel projector -> temporal pooling of `temporal_pool` consecutive
frames -> Llama decoder fed with [visual tokens, text tokens] as `inputs_embeds` (pieces from `jaxeff.models`).

A batch (`VideoBatch`) is padded: frames [B, F, h, w, c] with `num_frames` [B] real frames per video, text
[B, Lt] with `text_len` [B] real tokens and `targets` [B, Lt] (the token text position j must predict; -1 = no
loss). Each video's sequence is its real visual tokens followed by its real text tokens, packed to the front of a
`seq_len` buffer; padding slots sit after them (positions continue, so causal masking hides them) and carry no
loss. The loss is the cross-entropy summed over every target of the batch divided by the global target count.

MM-SP (`make_mmsp_loss`), one jitted program:
- Stage 1: the B*F frames (padded to a multiple of the device count, padding masked out) are sharded over all
  devices; each device runs ViT + projector on its own frames (`shard_map`).
- Stage 2: the multimodal sequence is built, padded to the layout multiple, permuted to the zigzag order and
  constrained to be sharded over (ring, ulysses): XLA performs the re-shard. The decoder then runs inside
  `shard_map` on S/N tokens per device with 2D attention; per-device CE sums and counts are `psum`-ed.
Run on CPU (8 host-platform devices) only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxeff.longvila.attention import mesh_degrees, sp_attention_local
from jaxeff.longvila.layout import layout_permutation, padded_length
from jaxeff.models.llama import Llama, LlamaConfig
from jaxeff.models.vit import DownsampleProjector, ViT, ViTConfig, temporal_pool


@dataclasses.dataclass(frozen=True)
class VideoVLMConfig:
    vision: ViTConfig
    llm: LlamaConfig
    spatial_merge: int = 2
    temporal_pool: int = 4
    select_layer: int | None = None  # None: post-LN last layer; VILA uses -2

    @property
    def tokens_per_group(self) -> int:
        return (-(-self.vision.grid_size // self.spatial_merge)) ** 2

    def visual_tokens(self, num_frames: int) -> int:
        return -(-num_frames // self.temporal_pool) * self.tokens_per_group


def tiny_config(vocab_size: int = 64, image_size: int = 16, patch_size: int = 4, temporal_pool: int = 2,
                num_heads: int = 8, num_kv_heads: int = 2, hidden: int = 64, layers: int = 2,
                rope_theta: float = 10000.0) -> VideoVLMConfig:
    vision = ViTConfig(image_size=image_size, patch_size=patch_size, num_channels=3, hidden_size=32,
                       intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    llm = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      rope_theta=rope_theta, max_position_embeddings=1 << 16)
    return VideoVLMConfig(vision=vision, llm=llm, temporal_pool=temporal_pool)


class VideoVLM(nnx.Module):
    def __init__(self, cfg: VideoVLMConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = cfg
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.vision = ViT(cfg.vision, **kw)
        self.projector = DownsampleProjector(cfg.vision.hidden_size, cfg.llm.hidden_size, cfg.vision.grid_size,
                                             cfg.spatial_merge, **kw)
        self.llm = Llama(cfg.llm, **kw)

    def encode_frames(self, pixels):
        """[N, h, w, c] -> [N, tokens_per_group, llm_hidden] (ViT + projector, per frame)."""
        return self.projector(self.vision(pixels, select_layer=self.config.select_layer))


class VideoBatch(NamedTuple):
    frames: jax.Array  # [B, F, h, w, c] float
    num_frames: jax.Array  # [B] int, 1 <= n <= F
    text: jax.Array  # [B, Lt] int
    text_len: jax.Array  # [B] int
    targets: jax.Array  # [B, Lt] int, -1 = no loss


def check_batch(batch: VideoBatch, cfg: VideoVLMConfig) -> None:
    b, f = batch.frames.shape[:2]
    v = cfg.vision
    if batch.frames.shape[2:] != (v.image_size, v.image_size, v.num_channels):
        raise ValueError(f"frames must be [B, F, {v.image_size}, {v.image_size}, {v.num_channels}], "
                         f"got {batch.frames.shape}")
    if batch.text.shape != batch.targets.shape or batch.text.shape[0] != b:
        raise ValueError(f"text {batch.text.shape} and targets {batch.targets.shape} must both be [B={b}, Lt]")
    nf, nt = np.asarray(batch.num_frames), np.asarray(batch.text_len)
    if nf.shape != (b,) or nt.shape != (b,) or nf.min() < 1 or nf.max() > f or nt.min() < 0 or \
            nt.max() > batch.text.shape[1]:
        raise ValueError(f"num_frames must be in [1, {f}] and text_len in [0, {batch.text.shape[1]}] per video")


def sequence_length(cfg: VideoVLMConfig, num_frames: int, text_len: int) -> int:
    """Tokens of the longest sequence a batch with these (padded) sizes can hold."""
    return cfg.visual_tokens(num_frames) + text_len


def build_sequence(model: VideoVLM, frame_tokens, batch: VideoBatch, seq_len: int):
    """Pack each video's real visual and text tokens to the front of a [B, seq_len] buffer.

    frame_tokens [B, F, T, D] -> (embeds [B, S, D], targets [B, S] with -1 = no loss, positions [B, S]).
    """
    b, f = frame_tokens.shape[:2]
    frame_mask = jnp.arange(f)[None] < batch.num_frames[:, None]
    pooled, group_mask = temporal_pool(frame_tokens, frame_mask, model.config.temporal_pool)
    g, t, d = pooled.shape[1:]
    visual = pooled.reshape(b, g * t, d)
    visual_valid = jnp.repeat(group_mask, t, axis=1)
    text_valid = jnp.arange(batch.text.shape[1])[None] < batch.text_len[:, None]
    x = jnp.concatenate([visual, model.llm.embed_tokens(batch.text).astype(visual.dtype)], axis=1)
    valid = jnp.concatenate([visual_valid, text_valid], axis=1)
    tgt = jnp.concatenate([jnp.full(visual_valid.shape, -1, jnp.int32), batch.targets.astype(jnp.int32)], axis=1)
    tgt = jnp.where(valid, tgt, -1)
    # Stable compaction: real tokens keep their order; everything else goes to a dropped slot.
    dest = jnp.where(valid, jnp.cumsum(valid, axis=1) - 1, seq_len)
    rows = jnp.arange(b)[:, None]
    embeds = jnp.zeros((b, seq_len, d), x.dtype).at[rows, dest].set(x, mode="drop")
    targets = jnp.full((b, seq_len), -1, jnp.int32).at[rows, dest].set(tgt, mode="drop")
    positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (b, seq_len))
    return embeds, targets, positions


def _token_stats(logits, targets):
    """Summed CE, target count and correct argmax count over positions with targets >= 0."""
    mask = targets >= 0
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets) & mask
    return jnp.sum(jnp.where(mask, ce, 0.0)), jnp.sum(mask).astype(jnp.float32), jnp.sum(correct).astype(jnp.float32)


def _stats_dict(ce, count, correct):
    return {"loss": ce / jnp.maximum(count, 1.0), "count": count, "correct": correct}


def vlm_loss(model: VideoVLM, batch: VideoBatch, seq_len: int | None = None):
    """Single-device loss (the unsplit reference). Returns (loss, {"loss", "count", "correct"})."""
    b, f = batch.frames.shape[:2]
    seq_len = seq_len or sequence_length(model.config, f, batch.text.shape[1])
    tokens = model.encode_frames(batch.frames.reshape(b * f, *batch.frames.shape[2:]))
    embeds, targets, positions = build_sequence(model, tokens.reshape(b, f, *tokens.shape[1:]), batch, seq_len)
    logits = model.llm(None, inputs_embeds=embeds, positions=positions)
    stats = _stats_dict(*_token_stats(logits, targets))
    return stats["loss"], stats


def unsplit_loss(model: VideoVLM, batch: VideoBatch):
    """The exactness reference: every video alone, unpadded, on one device, with the decoder's own attention;
    CE summed over all videos / global target count. `num_frames` and `text_len` must be concrete (numpy)."""
    check_batch(batch, model.config)
    nf, nt = np.asarray(batch.num_frames), np.asarray(batch.text_len)
    ce = count = correct = 0.0
    for i in range(len(nf)):
        video = VideoBatch(batch.frames[i:i + 1, :nf[i]], nf[i:i + 1], batch.text[i:i + 1, :nt[i]], nt[i:i + 1],
                           batch.targets[i:i + 1, :nt[i]])
        _, stats = vlm_loss(model, video)
        ce += stats["loss"] * stats["count"]
        count += stats["count"]
        correct += stats["correct"]
    stats = _stats_dict(ce, count, correct)
    return stats["loss"], stats


def random_batch(cfg: VideoVLMConfig, num_frames, text_len, *, max_frames: int | None = None,
                 max_text: int | None = None, seed: int = 0) -> VideoBatch:
    """Random frames/tokens/targets (about 1/4 of targets ignored) with the given per-video sizes."""
    rng = np.random.default_rng(seed)
    num_frames, text_len = np.asarray(num_frames, np.int32), np.asarray(text_len, np.int32)
    b, f, lt = len(num_frames), max_frames or int(num_frames.max()), max_text or int(text_len.max())
    v = cfg.vision
    targets = rng.integers(0, cfg.llm.vocab_size, (b, lt))
    return VideoBatch(
        frames=jnp.asarray(rng.normal(size=(b, f, v.image_size, v.image_size, v.num_channels)), jnp.float32),
        num_frames=num_frames,
        text=jnp.asarray(rng.integers(0, cfg.llm.vocab_size, (b, lt)), jnp.int32),
        text_len=text_len,
        targets=jnp.asarray(np.where(rng.random((b, lt)) < 0.25, -1, targets), jnp.int32),
    )


@dataclasses.dataclass(frozen=True)
class MMSPConfig:
    ring_axis: str = "ring"
    ulysses_axis: str = "ulysses"
    zigzag: bool = True
    num_sub_blocks: int = 2


def make_mmsp_loss(graphdef, mesh: Mesh, sp: MMSPConfig = MMSPConfig()):
    """`loss_fn(state, batch) -> (loss, stats)`: the MM-SP forward of `nnx.merge(graphdef, state)` over `mesh`.

    Differentiate it with `jax.value_and_grad(loss_fn, has_aux=True)` and wrap in `jax.jit`; `state` is
    replicated. Sequence length and frame counts come from the batch's static shapes.
    ValueError when `mesh` lacks `sp.ring_axis` or `sp.ulysses_axis` (`attention.mesh_degrees`).
    """
    ra, ua = sp.ring_axis, sp.ulysses_axis
    ring, uly = mesh_degrees(mesh, ra, ua)
    n = ring * uly
    seq_spec = P(None, (ra, ua))
    frame_spec = P((ra, ua))

    def encode_local(state, pixels):
        return nnx.merge(graphdef, state).encode_frames(pixels)

    def llm_local(state, embeds, targets, positions):
        model = nnx.merge(graphdef, state)
        attn = functools.partial(sp_attention_local, ring_axis=ra, ulysses_axis=ua, ring_size=ring,
                                 ulysses_size=uly, causal=True, num_sub_blocks=sp.num_sub_blocks)
        attention_fn = lambda i, q, k, v, *, q_positions, kv_positions: attn(q, k, v, q_positions, kv_positions)
        logits = model.llm(None, inputs_embeds=embeds, positions=positions, attention_fn=attention_fn)
        return tuple(lax.psum(x, (ra, ua)) for x in _token_stats(logits, targets))

    def loss_fn(state, batch: VideoBatch):
        model = nnx.merge(graphdef, state)
        b, f = batch.frames.shape[:2]
        # Stage 1: frames over all devices; padding frames are encoded and then dropped.
        total = b * f
        pixels = batch.frames.reshape(total, *batch.frames.shape[2:])
        pad = -total % n
        pixels = jnp.pad(pixels, ((0, pad),) + ((0, 0),) * 3)
        pixels = lax.with_sharding_constraint(pixels, NamedSharding(mesh, frame_spec))
        # check_vma=False: stage 1 has no collectives, so the varying-axes check guards nothing here, and on
        # jax >= 0.12 it rejects the ViT's exact GELU (its erfc lowers to a `polynomial` whose constant
        # coefficients are not marked varying: "Primitive polynomial requires varying manual axes to match").
        tokens = jax.shard_map(encode_local, mesh=mesh, in_specs=(P(), frame_spec), out_specs=frame_spec,
                               check_vma=False)(state, pixels)[:total]
        # Stage 2: pack, pad to the layout multiple, zigzag-permute, re-shard token-balanced.
        seq_len = padded_length(sequence_length(model.config, f, batch.text.shape[1]), ring, uly, sp.zigzag)
        embeds, targets, positions = build_sequence(model, tokens.reshape(b, f, *tokens.shape[1:]), batch, seq_len)
        perm = jnp.asarray(layout_permutation(seq_len, ring, uly, sp.zigzag))
        seq_sharding = NamedSharding(mesh, seq_spec)
        embeds, targets, positions = (lax.with_sharding_constraint(x[:, perm], seq_sharding)
                                      for x in (embeds, targets, positions))
        ce, count, correct = jax.shard_map(llm_local, mesh=mesh, in_specs=(P(), seq_spec, seq_spec, seq_spec),
                                           out_specs=(P(), P(), P()))(state, embeds, targets, positions)
        stats = _stats_dict(ce, count, correct)
        return stats["loss"], stats

    return loss_fn
