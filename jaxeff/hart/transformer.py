"""HART's scalable-resolution autoregressive transformer (text-to-image), mirroring `HARTForT2I`.

- Sequence: the text tokens (context) are the first "scale"; then one block of tokens per image scale
  1..S-1, each the area-downsampled running f_hat embedded by `word_embed`, plus a level embedding per scale.
- Blocks: Llama-style (RMSNorm, SwiGLU, q/v biases, softmax scale 0.25/sqrt(d)) with adaLN (6C) computed from the
  max-pooled text embedding.
- Positions: 1D RoPE for text tokens; HART's 2D RoPE for image tokens, coordinates normalised to the last scale's
  grid and offset by the last text position.
- Attention: through the shared front door `jaxeff.nn.attention` (XLA einsum on CPU; cuDNN / XLA fused attention on
  GPU, XLA on TPU). Block-causal over levels in training (the level index is the position, so key j is visible to
  query i iff level_j <= level_i; text tokens see all text tokens, padding included, as in the reference); at
  inference a KV cache across scales, each scale attending to everything before it and itself.
- KV cache: preallocated [2B, seq_len - n, H, D] per layer (n: the tokens of the last MAR iteration, which only
  that iteration reads; its call concatenates them), written with `lax.dynamic_update_slice` at static offsets
  (`cache="prealloc"`, default); `"concat"` grows it by concatenation (the earlier layout, kept to measure against);
  `"none"` recomputes the whole prefix at every scale (the check for both).
- Precision: `dtype` (compute) / `param_dtype` (weights), float32 by default; with bfloat16 the norms, the softmax
  statistics, the residual stream, RoPE, the logits and the diffusion sampler stay float32 (the reference runs
  under fp16 autocast).
- Last scale: MAR-style token subsampling in training (at least half the tokens dropped, >= 32 kept when there are
  more than 32); `num_maskgit_iters` iterations at inference (default 1, as the reference); its hidden states
  condition the residual diffusion head.
Run on CPU only.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.checks import require_int, require_number
from jaxeff.hart import diffusion as diff
from jaxeff.hart.chunks import map_chunks
from jaxeff.nn.attention import attention, kernel_default, materializes_scores

CACHE_LAYOUTS = ("prealloc", "concat", "none")
SCORE_BUDGET = 2**29  # bytes of float32 attention scores one call may hold under q_chunk="auto" (512 MiB)
MIN_Q_CHUNK = 16


def query_chunk(q_chunk: int | str | None, batch: int, heads: int, kv_len: int,
                materializes: bool = True) -> int | None:
    """Queries per attention call: `q_chunk` itself (int or None), or for "auto" the largest power of two (at
    least MIN_Q_CHUNK) whose float32 scores [batch, heads, q, kv_len] fit SCORE_BUDGET, so the score memory of a
    scale stays bounded as the batch grows (the last 1024px scale: 256 queries at batch 1 with CFG, 32 at 8).
    "auto" with `materializes=False` (an attention implementation that never holds the scores: the Pallas / cuDNN
    kernels, `jaxeff.nn.attention.materializes_scores`) is None: one call, as chunks there only cost time.
    Raises ValueError for anything else."""
    if q_chunk == "auto" and not materializes:
        return None
    if q_chunk == "auto":
        fit = SCORE_BUDGET // (batch * heads * kv_len * 4)
        return max(MIN_Q_CHUNK, 2 ** int(math.log2(max(fit, 1))))
    if q_chunk is None or (isinstance(q_chunk, int) and q_chunk >= 1):
        return q_chunk
    raise ValueError(f'q_chunk must be an int >= 1, None or "auto", got {q_chunk!r}')


@dataclasses.dataclass(frozen=True)
class HARTConfig:
    """Transformer + diffusion head. Defaults: the hart-0.7b-1024px layout as far as it is public (C=1536 and depth
    16 are inferred from the ~732M parameter count; num_heads from head_dim 64). `from_pretrained` reads the real
    values from `llm/config.json`."""

    embed_dim: int = 1536
    depth: int = 16
    num_heads: int = 24
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    context_token: int = 300
    context_dim: int = 1536
    vocab_size: int = 4096
    cvae: int = 32
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
    attn_l2_norm: bool = False
    use_context_norm: bool = False
    context_norm_scale: float = 1.0
    rope_theta: float = 10000.0
    cond_drop_rate: float = 0.1
    diff_width: int = 1024
    diff_depth: int = 6
    num_sampling_steps: int = 8
    diffusion_batch_mul: int = 4
    mar_min_keep: int = 32  # last-scale tokens always kept by the training subsampling
    vae_scale: float = 0.6  # residual tokens are divided by this for the diffusion head (x0 is clipped to [-1, 1])

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if (self.embed_dim // self.num_heads) % 4:
            raise ValueError("head_dim must be a multiple of 4 for HART's 2D RoPE")
        if self.context_token < 1:
            raise ValueError("context_token must be >= 1 (text tokens are the first scale)")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return int((self.embed_dim * self.mlp_ratio * 2) / 3 + 255) // 256 * 256

    @property
    def num_image_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def seq_len(self) -> int:
        """Training sequence length: text tokens + all scales but the first (predicted from the last text token)."""
        return self.context_token + self.num_image_tokens - 1


# ----------------------------------------------------------------------------------------------- positions


def scale_coords(patch_nums: tuple[int, ...], si: int) -> np.ndarray:
    """[pn*pn, 2] 2D RoPE coordinates of scale `si`, normalised to the largest grid (row-major, (row, col))."""
    pn, big = patch_nums[si], patch_nums[-1]
    ii, jj = np.meshgrid(np.arange(pn), np.arange(pn), indexing="ij")
    return (np.stack([ii, jj], -1).reshape(-1, 2) / pn * big).astype(np.float32)


def rope_1d(pos, dim: int, theta: float):
    """pos [B, L] -> (cos, sin) [B, L, dim], HF Llama layout (halves)."""
    inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    f = pos.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([f, f], -1)
    return jnp.cos(emb), jnp.sin(emb)


def rope_2d(pos, dim: int, theta: float):
    """pos [B, L, 2] -> (cos, sin) [B, L, dim]: [axis0 (f, f), axis1 (f, f)] with dim/4 frequencies of stride 4,
    exactly the reference `LlamaRotaryEmbedding` (so rotate_half pairs axis-0 and axis-1 channels)."""
    inv = 1.0 / theta ** (np.arange(0, dim, 4, dtype=np.float32) / dim)
    f0 = pos[..., 0:1].astype(jnp.float32) * inv
    f1 = pos[..., 1:2].astype(jnp.float32) * inv
    emb = jnp.concatenate([f0, f0, f1, f1], -1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x [B, L, H, D]; cos/sin [B, L, D]."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, :, None] + rot * sin[:, :, None]


def image_rope(cfg: HARTConfig, scales, offset):
    """cos/sin for the tokens of `scales` (list of scale indices >= 1), offset [B] = last text position."""
    coords = np.concatenate([scale_coords(cfg.patch_nums, s) for s in scales], 0)
    pos = jnp.asarray(coords)[None] + offset.astype(jnp.float32)[:, None, None]
    return rope_2d(pos, cfg.head_dim, cfg.rope_theta)


# ----------------------------------------------------------------------------------------------- modules


def _linear(din, dout, rngs, bias=True, std=0.02, dtype=jnp.float32, param_dtype=jnp.float32):
    return nnx.Linear(din, dout, use_bias=bias, kernel_init=nnx.initializers.truncated_normal(std), rngs=rngs,
                      dtype=dtype, param_dtype=param_dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with a weight; the reference's fused kernel applies it even where `elementwise_affine=False`."""

    def __init__(self, dim: int, eps: float, scale: float = 1.0):
        self.weight = nnx.Param(jnp.full((dim,), scale, jnp.float32))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps) * self.weight).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: HARTConfig, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        c = cfg.embed_dim
        self.cfg, self.dtype = cfg, dtype
        lin = functools.partial(_linear, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.qkv_proj = lin(c, 3 * c, bias=False)
        self.q_bias = nnx.Param(jnp.zeros((c,), param_dtype))
        self.v_bias = nnx.Param(jnp.zeros((c,), param_dtype))
        self.proj = lin(c, c, std=0.02 / math.sqrt(2 * cfg.depth))
        if cfg.attn_l2_norm:
            self.scale_mul_1H11 = nnx.Param(jnp.full((1, cfg.num_heads, 1, 1), math.log(4.0)))

    def __call__(self, x, cos, sin, positions=None, past=None, start=None, implementation=None, q_chunk=None):
        """x [B, L, C]. Returns (out [B, L, C], (k, v)).

        - positions (q [B, L], kv [B, L_kv]) int: block-causal attention over this call's tokens (key visible iff
          0 <= kv <= q; the level index is the position, -1 hides a key); None: every key visible.
        - past (k, v) [B, L_past or T_max, H, D]: a KV cache. With `start` (static int) it is preallocated: the new
          k/v are written at slots start..start+L-1 and the queries attend to slots [0, start+L); the returned
          (k, v) are the updated buffers. Without `start` the new k/v are concatenated after it.
        - implementation: passed to `jaxeff.nn.attention` ("xla" materialises the scores). None: with every key
          visible (positions None), `jaxeff.nn.attention.kernel_default` (the Pallas kernel on a TPU for >= 128
          queries; cuDNN's fused attention on a GPU in bf16 / fp16; no score matrix), else the front door's
          per-backend default.
        - q_chunk: with every key visible (positions None), the queries are attended at most `q_chunk` at a time
          (int, or "auto": `query_chunk`) in a `lax.map` (`jaxeff.hart.chunks.map_chunks`, equal chunks), so an
          implementation that materialises the scores (XLA; "dot_product", which is XLA on every backend) holds
          [B, H, chunk, L_kv] float32 instead of [B, H, L, L_kv] (the last 1024px scale: 4096 x 9750 per head);
          "auto" is one call where `jaxeff.nn.attention.materializes_scores` says the implementation holds no
          scores ("pallas"); None: one call."""
        b, n, c = x.shape
        h, d = self.cfg.num_heads, self.cfg.head_dim
        bias = jnp.concatenate([self.q_bias[...], jnp.zeros_like(self.q_bias[...]), self.v_bias[...]])
        qkv = (self.qkv_proj(x) + bias.astype(self.dtype)).reshape(b, n, 3, h, d)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.cfg.attn_l2_norm:
            q, k = q.astype(jnp.float32), k.astype(jnp.float32)
            mul = jnp.exp(jnp.minimum(self.scale_mul_1H11[...], math.log(100.0))).reshape(1, 1, h, 1)
            q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12) * mul
            k = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(d)
        q, k = (apply_rope(a, cos, sin).astype(self.dtype) for a in (q, k))
        if past is None:
            kv = (k, v)
            k_att, v_att = kv
        elif start is None:
            kv = (jnp.concatenate([past[0], k], 1), jnp.concatenate([past[1], v], 1))
            k_att, v_att = kv
        else:
            kv = tuple(jax.lax.dynamic_update_slice(p, a.astype(p.dtype), (0, start, 0, 0))
                       for p, a in zip(past, (k, v), strict=True))
            k_att, v_att = (a[:, :start + n].astype(self.dtype) for a in kv)
        q_pos, kv_pos = (None, None) if positions is None else positions
        if positions is None and implementation is None:  # a fused kernel where one takes the call (TPU; GPU bf16)
            implementation = kernel_default(n, k_att.shape[1], d, causal=False, dtype=q.dtype)

        def attend(q):
            return attention(q, k_att, v_att, q_positions=q_pos, kv_positions=kv_pos, causal=positions is not None,
                             scale=scale, implementation=implementation)

        if positions is None and q_chunk is not None:
            chunk = query_chunk(q_chunk, b, h, k_att.shape[1], materializes_scores(implementation))
            o = map_chunks(attend, (q,), chunk, axis=1)
        else:
            o = attend(q)
        return self.proj(o.reshape(b, n, c).astype(self.dtype)), kv


class FFN(nnx.Module):
    def __init__(self, cfg: HARTConfig, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        c, hdim = cfg.embed_dim, cfg.ffn_hidden
        lin = functools.partial(_linear, rngs=rngs, bias=False, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = lin(c, hdim)
        self.up_proj = lin(c, hdim)
        self.down_proj = lin(hdim, c, std=0.02 / math.sqrt(2 * cfg.depth))

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def _ada_init(c: int, k: int):
    """adaLN init of the reference: gamma rows x1e-5, scale/shift rows x0.5 (init_adaln, init_adaln_gamma)."""

    def init(key, shape, dtype=jnp.float32):
        w = nnx.initializers.truncated_normal(0.02)(key, shape, dtype)
        mul = jnp.concatenate([jnp.full((2 * c,), 1e-5), jnp.full(((k - 2) * c,), 0.5)]) if k == 6 else 0.5
        return w * mul

    return init


class Block(nnx.Module):
    def __init__(self, cfg: HARTConfig, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        c = cfg.embed_dim
        self.attn = Attention(cfg, rngs, dtype, param_dtype)
        self.ffn = FFN(cfg, rngs, dtype, param_dtype)
        self.ln_wo_grad = RMSNorm(c, cfg.norm_eps)
        self.ada_lin = nnx.Linear(c, 6 * c, kernel_init=_ada_init(c, 6), rngs=rngs, dtype=dtype,
                                  param_dtype=param_dtype)

    def __call__(self, x, cond, cos, sin, positions=None, past=None, start=None, implementation=None,
                 q_chunk=None):
        """x [B, L, C] (the residual stream keeps x's dtype: float32 in the pipeline); cond: pooled condition
        [B, C]; the rest as `Attention.__call__`."""
        g1, g2, s1, s2, b1, b2 = jnp.split(self.ada_lin(jax.nn.silu(cond))[:, None], 6, axis=-1)
        a, kv = self.attn(self.ln_wo_grad(x) * (1 + s1) + b1, cos, sin, positions, past, start, implementation,
                          q_chunk)
        x = x + a * g1
        x = x + self.ffn(self.ln_wo_grad(x) * (1 + s2) + b2) * g2
        return x, kv


class HeadNorm(nnx.Module):
    def __init__(self, cfg: HARTConfig, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        c = cfg.embed_dim
        self.ln_wo_grad = RMSNorm(c, cfg.norm_eps)
        self.ada_lin = nnx.Linear(c, 2 * c, kernel_init=_ada_init(c, 2), rngs=rngs, dtype=dtype,
                                  param_dtype=param_dtype)

    def __call__(self, x, cond):
        scale, shift = jnp.split(self.ada_lin(jax.nn.silu(cond))[:, None], 2, axis=-1)
        return self.ln_wo_grad(x) * (1 + scale) + shift


class HARTTransformer(nnx.Module):
    """`dtype`: compute dtype of the matmuls and the KV cache; `param_dtype`: weights (norm weights, the level
    embedding and the l2-norm attention scales stay float32). Outputs (hidden states, logits) are float32."""

    def __init__(self, cfg: HARTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.cfg, self.dtype = cfg, dtype
        c = cfg.embed_dim
        init_std = math.sqrt(1 / c / 3)
        lin = functools.partial(_linear, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.word_embed = lin(cfg.cvae, c)
        self.context_embed = lin(cfg.context_dim, c, std=init_std)
        self.context_norm = (RMSNorm(cfg.context_dim, cfg.norm_eps, cfg.context_norm_scale)
                             if cfg.use_context_norm else None)
        self.lvl_embed = nnx.Embed(len(cfg.patch_nums), c, embedding_init=nnx.initializers.truncated_normal(init_std),
                                   rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs, dtype, param_dtype) for _ in range(cfg.depth)])
        self.head_nm = HeadNorm(cfg, rngs, dtype, param_dtype)
        self.head = lin(c, cfg.vocab_size, std=0.02 * 0.02)
        self.decoder_norm = RMSNorm(c, cfg.norm_eps)
        self.diffloss = diff.SimpleMLPAdaLN(cfg.cvae, c, cfg.diff_width, cfg.diff_depth, rngs=rngs, dtype=dtype,
                                            param_dtype=param_dtype)

    # -- pieces shared by training and generation
    def embed_context(self, context):
        """context [B, T, context_dim] -> (token embeddings [B, T, C], pooled adaLN condition [B, C])."""
        if self.context_norm is not None:
            context = self.context_norm(context)
        e = self.context_embed(context).astype(jnp.float32)
        return e, jnp.max(e, axis=1)

    def embed_tokens(self, vectors, level: int):
        """word_embed(vectors [B, n, Cvae]) + the level embedding of scale `level`, float32 [B, n, C]."""
        return self.word_embed(vectors).astype(jnp.float32) + self.lvl_embed(jnp.full((1,), level))[None]

    def run_blocks(self, x, cond, cos, sin, positions=None, past=None, start=None, implementation=None,
                   q_chunk=None):
        """All blocks (arguments as `Block.__call__`; past: one (k, v) per layer). Returns (h, [(k, v)] per layer)."""
        kvs = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, cond, cos, sin, positions, None if past is None else past[i], start, implementation,
                        q_chunk)
            kvs.append(kv)
        return x, kvs

    def init_cache(self, batch: int, length: int | None = None):
        """Preallocated KV cache: per layer (k, v) zeros [batch, length (default seq_len), H, D] in the compute
        dtype."""
        shape = (batch, self.cfg.seq_len if length is None else length, self.cfg.num_heads, self.cfg.head_dim)
        return [(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in self.blocks]

    def logits(self, h, cond):
        return self.head(self.head_nm(h, cond)).astype(jnp.float32)

    def diffusion_condition(self, h_last, code_vectors):
        """decoder_norm(hidden + word_embed(code vectors of the sampled last-scale tokens)), float32."""
        return self.decoder_norm(h_last + self.word_embed(code_vectors).astype(jnp.float32))

    # -- training
    def forward_train(self, context, ctx_pos, teacher, keep=None, implementation=None):
        """Teacher-forced forward.

        context [B, T, Dctx], ctx_pos [B, T] text positions, teacher [B, L-1, Cvae] inputs of scales 1..S-1,
        keep [B, pn_last^2] bool (MAR subsampling of the last scale; None keeps all).
        Returns (logits [B, L, V] predicting every scale's tokens, last-scale hidden [B, pn_last^2, C])."""
        cfg = self.cfg
        x, cond, cos, sin, positions = self.training_inputs(context, ctx_pos, teacher, keep)
        h, _ = self.run_blocks(x, cond, cos, sin, positions, implementation=implementation)
        return self.logits(h[:, cfg.context_token - 1:], cond), h[:, -cfg.patch_nums[-1] ** 2:]

    def training_inputs(self, context, ctx_pos, teacher, keep=None):
        """What the blocks see in `forward_train`: (x [B, T+L-1, C] float32, pooled condition [B, C], cos/sin
        [B, T+L-1, head_dim], positions (q, kv) [B, T+L-1] int32: each token's level (0 for text), the keys of
        dropped last-scale tokens at -1, so attention is block-causal over levels)."""
        cfg = self.cfg
        e_ctx, cond = self.embed_context(context)
        levels = level_ids(cfg)
        x = jnp.concatenate([e_ctx, self.word_embed(teacher).astype(jnp.float32)], 1)
        x = x + self.lvl_embed(jnp.asarray(levels))[None]
        cos_t, sin_t = rope_1d(ctx_pos, cfg.head_dim, cfg.rope_theta)
        cos_i, sin_i = image_rope(cfg, range(1, len(cfg.patch_nums)), ctx_pos[:, -1])
        cos, sin = jnp.concatenate([cos_t, cos_i], 1), jnp.concatenate([sin_t, sin_i], 1)
        q_pos = jnp.broadcast_to(jnp.asarray(levels), x.shape[:2])
        kv_pos = q_pos
        if keep is not None:
            n_last = cfg.patch_nums[-1] ** 2
            key_keep = jnp.concatenate([jnp.ones((keep.shape[0], x.shape[1] - n_last), bool), keep], 1)
            kv_pos = jnp.where(key_keep, q_pos, -1)
        return x, cond, cos, sin, (q_pos, kv_pos)


def level_ids(cfg: HARTConfig) -> np.ndarray:
    """[seq_len] int32 level of each training-sequence token: 0 for the text tokens, si for scale si >= 1."""
    return np.concatenate([np.zeros(cfg.context_token, np.int32)] +
                          [np.full(p * p, i + 1, np.int32) for i, p in enumerate(cfg.patch_nums[1:])])


# ----------------------------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """Sampling options of `generate_fhat`, checked at construction (ValueError naming the field and its valid
    range). The ranges keep every meaning the reference gives (`autoregressive_infer_cfg`,
    `sample_with_top_k_top_p_`): top_k / top_k_late 0 = no top-k filter (`top_k > 0` gates it), top_p 0 = off and
    1 keeps every token, cfg 0 = no guidance, temperature 0 = noise-free diffusion sampling (the noise term is
    scaled by it). A top_k at or above the vocabulary keeps every token, as top-k with k = V does (the reference's
    torch.topk raises for k > V; here the defaults 600 / 300 must also run models with small vocabularies)."""

    cfg: float = 4.5  # >= 0
    top_k: int = 600  # >= 0; the reference drops to `top_k_late` from scale 7 on
    top_k_late: int = 300  # >= 0
    top_p: float = 0.0  # in [0, 1]
    more_smooth: bool = True  # Gumbel-softmax smoothing of the code vectors (the released sample.py default)
    temperature: float = 1.0  # >= 0; diffusion head temperature
    use_diffusion: bool = True  # False: discrete-only last scale (the reference's final_stage != 0)
    num_maskgit_iters: int = 1  # >= 1; MAR iterations of the last scale (the reference's default: all at once)

    def __post_init__(self):
        # ValueError (NotANumberError for a non-number) naming the field; the official code also runs negative cfg
        # and treats negative top_k / top_p as off, spellings refused here (0 is the documented "off")
        for name, low, high in (("cfg", 0.0, math.inf), ("top_p", 0.0, 1.0), ("temperature", 0.0, math.inf)):
            require_number(getattr(self, name), f"SampleOptions.{name}", low, high)
        for name, low in (("top_k", 0), ("top_k_late", 0), ("num_maskgit_iters", 1)):
            require_int(getattr(self, name), f"SampleOptions.{name}", low)


def cfg_ramp(cfg: float, num_scales: int) -> np.ndarray:
    """Guidance strength per scale: cfg * si / (S - 1) for si < S - 1; the last scale reuses the ramp of S - 2
    (the reference computes its `t` with the loop's last `ratio`)."""
    r = np.arange(num_scales, dtype=np.float64) / (num_scales - 1)
    r[-1] = r[-2]
    return cfg * r


def maskgit_schedule(n: int, iters: int) -> list[int]:
    """Tokens predicted by each MAR iteration of the last scale (n tokens, `iters` iterations), as in the
    reference's `autoregressive_infer_cfg`: after step k, floor(n * cos(pi/2 * (k+1)/iters)) tokens stay masked,
    clamped to [1, still masked - 1]; the last step predicts all that remain. A step may predict 0 tokens."""
    counts, masked = [], n
    for step in range(iters - 1):
        keep_masked = max(1, min(masked - 1, math.floor(n * math.cos(math.pi / 2 * (step + 1) / iters))))
        counts.append(masked - keep_masked)
        masked = keep_masked
    return counts + [masked]


def filter_logits(logits, top_k: int, top_p: float):
    """Top-k then top-p filtering (masked to -inf), as `sample_with_top_k_top_p_`."""
    v = logits.shape[-1]
    if 0 < top_k < v:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p > 0:
        order = jnp.argsort(logits, -1)
        srt = jnp.take_along_axis(logits, order, -1)
        remove = jnp.cumsum(jax.nn.softmax(srt, -1), -1) <= (1 - top_p)
        remove = remove.at[..., -1].set(False)
        inv = jnp.argsort(order, -1)
        logits = jnp.where(jnp.take_along_axis(remove, inv, -1), -jnp.inf, logits)
    return logits


def _code_vectors(logits, idx, codebook, ratio: float, more_smooth: bool, key):
    if not more_smooth:
        return codebook[idx]
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    g = -jnp.log(jax.random.exponential(key, logits.shape))
    return jax.nn.softmax((logits * (1 + ratio) + g) / tau, -1) @ codebook


def generate_fhat(model: HARTTransformer, quantizer, context, ctx_pos, key, opts: SampleOptions,
                  cache: str = "prealloc", return_tokens: bool = False, mar_order=None, implementation=None,
                  q_chunk: int | str | None = "auto", diffusion_chunk: int | None = 4096):
    """Sample the final latent f_hat [B, h, w, Cvae] for a batch of encoded prompts.

    context [B, T, Dctx], ctx_pos [B, T]. CFG always runs on a doubled batch (uncond: zero context, zero
    positions), like `autoregressive_infer_cfg`. `cache`: "prealloc" (one [2B, seq_len - n_last_iteration, H, D]
    buffer per layer written in place), "concat" (grown by concatenation) or "none" (recompute the whole prefix at
    every scale with block-causal positions: the check for the KV cache); all three give the same numbers.
    `implementation`: the `jaxeff.nn.attention` implementation (None: per backend); `q_chunk`: queries per
    attention call with the cache (int, "auto" = `query_chunk`'s budget, None = all at once; bounds the score
    memory of the last scales);
    `diffusion_chunk`: last-scale tokens per call of the diffusion head (`diffusion.sample`'s `token_chunk`).
    Both change memory, not the numbers (up to float reassociation). `return_tokens` also returns the sampled
    indices and the guided logits of every scale (the last scale in raster order). Raises ValueError for an
    unknown `cache` or a bad `q_chunk`.

    The last scale runs `opts.num_maskgit_iters` MAR iterations (`maskgit_schedule`): each predicts its tokens
    from the last scale's input at those positions, attending to the earlier scales and, through the KV cache, the
    tokens of earlier iterations (their inputs, not their predictions, and their states computed before later
    iterations existed: block-causal over iterations, as in the reference). `mar_order` [B, pn_last^2] int: the
    order in which positions are unmasked (the last ones first); default a random permutation per sample (the
    reference draws it with numpy)."""
    if cache not in CACHE_LAYOUTS:
        raise ValueError(f"unknown cache layout {cache!r}; choose from {CACHE_LAYOUTS}")
    query_chunk(q_chunk, 1, 1, 1)  # refuses a bad value before tracing anything
    cfg = model.cfg
    pns = cfg.patch_nums
    n_s = len(pns)
    b = context.shape[0]
    ramp = cfg_ramp(opts.cfg, n_s)
    codebook = quantizer.codebook
    ctx2 = jnp.concatenate([context, jnp.zeros_like(context)], 0)
    pos2 = jnp.concatenate([ctx_pos, jnp.zeros_like(ctx_pos)], 0)
    e_ctx, cond = model.embed_context(ctx2)
    offset = pos2[:, -1]
    x = e_ctx + model.lvl_embed(jnp.zeros((cfg.context_token,), jnp.int32))[None]
    f_hat = jnp.zeros((b, pns[-1], pns[-1], cfg.cvae), jnp.float32)
    # the KV cache (and the next free slot), or every (x, cos, sin) run so far when recomputing. Nothing reads the
    # keys / values of the last MAR iteration but that iteration, so they stay out of the preallocated cache (the
    # last call concatenates them): at 1024px that is 4096 of 9750 slots, 0.8 GB per image in bfloat16.
    cache_len = cfg.seq_len - maskgit_schedule(pns[-1] ** 2, opts.num_maskgit_iters)[-1]
    past, filled, prefix = (model.init_cache(2 * b, cache_len) if cache == "prealloc" else None), 0, []

    def run(x, cos, sin):
        nonlocal past, filled
        if cache != "none":
            start = filled if cache == "prealloc" and filled + x.shape[1] <= cache_len else None
            h, past = model.run_blocks(x, cond, cos, sin, None, past, start, implementation, q_chunk)
            filled += x.shape[1]
            return h
        prefix.append((x, cos, sin))
        levels = np.concatenate([np.full(p[0].shape[1], i, np.int32) for i, p in enumerate(prefix)])
        xs, coss, sins = (jnp.concatenate(a, 1) for a in zip(*prefix))
        lv = jnp.broadcast_to(jnp.asarray(levels), xs.shape[:2])
        h, _ = model.run_blocks(xs, cond, coss, sins, (lv, lv), implementation=implementation)
        return h[:, -x.shape[1]:]

    def pick(h, si, key):
        """Guided logits [B, n, V], sampled indices [B, n], code vectors [B, n, Cvae] and the diffusion key."""
        t = float(ramp[si])
        ratio = si / (n_s - 1) if si < n_s - 1 else (n_s - 2) / (n_s - 1)
        lg = model.logits(h, cond)
        lg = (1 + t) * lg[:b] - t * lg[b:]
        filtered = filter_logits(lg, opts.top_k if si < 7 else opts.top_k_late, opts.top_p)
        k_s, k_g, k_d = jax.random.split(key, 3)
        idx = jax.random.categorical(k_s, filtered, axis=-1)
        return lg, idx, _code_vectors(filtered, idx, codebook, ratio, opts.more_smooth, k_g), k_d

    tokens, all_logits = [], []
    for si, pn in enumerate(pns[:-1]):
        h = run(x, *(rope_1d(pos2, cfg.head_dim, cfg.rope_theta) if si == 0 else image_rope(cfg, [si], offset)))
        key, k = jax.random.split(key)
        lg, idx, vec, _ = pick(h[:, -1:] if si == 0 else h, si, k)
        tokens.append(idx), all_logits.append(lg)
        f_hat, nxt = quantizer.next_autoregressive_input(si, f_hat, vec.reshape(b, pn, pn, -1))
        nxt = model.embed_tokens(nxt.reshape(b, -1, cfg.cvae), si + 1)
        x = jnp.concatenate([nxt, nxt], 0)

    # last scale: MAR iterations over subsets of its positions
    si, n = n_s - 1, pns[-1] ** 2
    t = float(ramp[si])
    if mar_order is not None:
        order = jnp.asarray(mar_order, jnp.int32)
    elif opts.num_maskgit_iters > 1:
        key, k_o = jax.random.split(key)
        order = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(k_o, b))
    else:
        order = jnp.broadcast_to(jnp.arange(n), (b, n))
    coords = jnp.asarray(scale_coords(pns, si))
    sched = diff.Schedule.make(1000, cfg.num_sampling_steps)
    out_vec = jnp.zeros((b, n, cfg.cvae), jnp.float32)
    out_idx, out_lg = jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n, cfg.vocab_size), jnp.float32)
    masked = n
    for count in maskgit_schedule(n, opts.num_maskgit_iters):
        if count == 0:
            continue
        sel = jnp.sort(order[:, masked - count: masked], -1)  # raster order within a step, like nonzero()
        masked -= count
        sel2 = jnp.concatenate([sel, sel], 0)
        pos = coords[sel2] + offset.astype(jnp.float32)[:, None, None]
        h = run(jnp.take_along_axis(x, sel2[..., None], 1), *rope_2d(pos, cfg.head_dim, cfg.rope_theta))
        key, k = jax.random.split(key)
        lg, idx, vec, k_d = pick(h, si, k)
        if opts.use_diffusion:
            z = model.diffusion_condition(h, jnp.concatenate([codebook[idx]] * 2, 0)).reshape(2 * b * count, -1)
            m = b * count
            # cfg exactly 1 takes the reference's unguided branch of DiffLoss.sample
            res = diff.sample(model.diffloss, sched, z[:m], k_d, z_uncond=None if t == 1.0 else z[m:], cfg=t,
                              temperature=opts.temperature, scale=cfg.vae_scale, token_chunk=diffusion_chunk)
            vec = vec + res.reshape(b, count, -1)
        rows = jnp.arange(b)[:, None]
        out_vec, out_idx, out_lg = (o.at[rows, sel].set(v) for o, v in ((out_vec, vec), (out_idx, idx),
                                                                         (out_lg, lg)))
    tokens.append(out_idx), all_logits.append(out_lg)
    f_hat, _ = quantizer.next_autoregressive_input(si, f_hat, out_vec.reshape(b, pns[-1], pns[-1], -1))
    return (f_hat, tokens, all_logits) if return_tokens else f_hat


@functools.partial(jax.jit, static_argnames=("graphdef", "opts", "cache", "implementation", "q_chunk",
                                             "diffusion_chunk"))
def generate_fhat_jit(graphdef, state, context, ctx_pos, key, opts: SampleOptions, cache: str = "prealloc",
                      implementation=None, q_chunk: int | str | None = "auto", diffusion_chunk: int | None = 4096):
    """One compiled program for the whole multi-scale generation. graphdef/state = nnx.split((model, quantizer))."""
    model, quantizer = nnx.merge(graphdef, state)
    return generate_fhat(model, quantizer, context, ctx_pos, key, opts, cache, implementation=implementation,
                         q_chunk=q_chunk, diffusion_chunk=diffusion_chunk)


def sample_keep_mask(key, batch: int, n_last: int, min_keep: int = 32):
    """MAR training mask of the last scale (True = kept): mask ratio from a truncated normal on [0.5, 1]
    (mean 1, std 0.25), always keeping `min_keep` tokens (32 in the reference; nothing dropped if n_last <= it)."""
    k1, k2 = jax.random.split(key)
    rate = 1.0 + 0.25 * jax.random.truncated_normal(k1, -2.0, 0.0)
    n_drop = jnp.clip(jnp.ceil(n_last * rate).astype(jnp.int32), 0, max(n_last - min_keep, 0))
    ranks = jnp.argsort(jax.random.uniform(k2, (batch, n_last)), -1)  # a random order per sample
    return ranks >= n_drop
