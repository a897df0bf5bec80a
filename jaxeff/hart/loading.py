"""Loading the released HART checkpoints (`hart-0.7b-1024px`: `llm/` + `tokenizer/`) into the NNX modules.

Every parameter of our modules is mapped to one official key by explicit renaming rules (`official_key`); the
shared `jaxeff.io.state_dict.load_mapped` reports missing, unexpected and shape-mismatched keys by name. Official
buffers that carry no weights (`lvl_1L`, `attn_bias_for_masking`, `zero_k_bias`, VQ usage statistics) and the
tokenizer's discriminator (`disc.*`) are skipped. PyTorch `.bin` files go through `bin_to_numpy` (needs torch,
imported lazily).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from jaxeff.hart.tokenizer import HARTTokenizer, TokenizerConfig
from jaxeff.hart.transformer import HARTConfig, HARTTransformer
from jaxeff.io import hub
from jaxeff.io.safetensors import load_checkpoint_dir, load_file, save_file
from jaxeff.io.state_dict import CheckpointMismatchError, load_mapped, to_torch, torch_key, torch_layout

_IGNORED = re.compile(
    r"^(lvl_1L|attn_bias_for_masking|blocks\.\d+\.attn\.zero_k_bias|.*rotary_emb.*\.inv_freq"
    r"|vae\.quantize\.ema_vocab_hit_SV|disc\..*|vae\.decoder2\..*|vae\.post_quant_conv2\..*)$"
)

_TRANSFORMER_RULES = [
    (r"\.ada_lin\.", ".ada_lin.1."),
    (r"^diffloss\.", "diffloss.net."),
    (r"\.time_embed\.fc1\.", ".time_embed.mlp.0."),
    (r"\.time_embed\.fc2\.", ".time_embed.mlp.2."),
    (r"\.mlp\.fc1\.", ".mlp.0."),
    (r"\.mlp\.fc2\.", ".mlp.2."),
    (r"\.ada\.", ".adaLN_modulation.1."),
]
_TOKENIZER_RULES = [  # after the decoder's level index is reversed (`_vae_level`)
    (r"^encoder\.conv_blocks\.", "encoder.down."),
    (r"^decoder\.conv_blocks\.", "decoder.up."),
    (r"^(encoder\.down|decoder\.up)\.(\d+)\.res\.", r"\1.\2.block."),
    (r"\.mid\.0\.", ".mid.block_1."),
    (r"\.mid\.1\.(norm|qkv|proj_out)\.", r".mid.attn_1.\1."),
    (r"\.mid\.[12]\.", ".mid.block_2."),  # mid.1 is the second resnet block when there is no mid attention
    (r"^quantize\.quant_resi\.(\d+)\.conv\.", r"quantize.quant_resi.qresi_ls.\1."),
    (r"^", "vae."),
]


def _vae_level(mods: list[str], levels: int) -> list[str]:
    """Our decoder stores levels lowest resolution first (LlamaGen); VAR's `decoder.up` list is the other way."""
    if mods[:2] == ["decoder", "conv_blocks"]:
        return mods[:2] + [str(levels - 1 - int(mods[2]))] + mods[3:]
    return mods


def official_key(path: tuple, kind: str, levels: int = 0) -> str:
    """Our parameter path -> the key in the official state dict (`kind`: "transformer" or "tokenizer"; `levels`:
    the tokenizer's number of resolution levels, len(ch_mult))."""
    name = torch_key(tuple(_vae_level([str(p) for p in path], levels)) if kind == "tokenizer" else path)
    for pat, rep in _TRANSFORMER_RULES if kind == "transformer" else _TOKENIZER_RULES:
        name = re.sub(pat, rep, name)
    return name


def load_into(module, tensors: dict, kind: str, source: str, dtype=jnp.float32):
    """Fill `module` (possibly abstract, from nnx.eval_shape) from an official state dict; returns the module.
    Arrays are cast to `dtype` (None: each variable's own dtype)."""
    levels = len(module.cfg.ch_mult) if kind == "tokenizer" else 0
    return load_mapped(module, tensors, lambda p: (official_key(p, kind, levels), torch_layout(p)), source=source,
                       what=f"the {kind}", ignore=_IGNORED.match, dtype=dtype)


def bin_to_numpy(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch `.bin` state dict (optional dependency: torch)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path} is a PyTorch .bin file; install torch to convert it (or use safetensors)") from e
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}


def convert_bin_dir(directory: str | Path) -> list[Path]:
    """Write `<stem>.safetensors` next to every `<stem>.bin` of a directory (so later loads need no torch)."""
    from jaxeff.io.safetensors import save_file

    written = []
    for b in sorted(Path(directory).glob("*.bin")):
        out = b.with_suffix(".safetensors")
        if not out.exists():
            save_file(bin_to_numpy(b), out)
        written.append(out)
    return written


def read_weights(directory: Path, stems: tuple[str, ...]) -> tuple[dict, str]:
    """First of `stems` present as safetensors (single or sharded) or `.bin`; returns (tensors, file used)."""
    for stem in stems:
        for cand in (directory / f"{stem}.safetensors", directory / f"{stem}.safetensors.index.json"):
            if cand.exists():
                return load_checkpoint_dir(directory, stem), str(cand)
        if (directory / f"{stem}.bin").exists():
            return bin_to_numpy(directory / f"{stem}.bin"), str(directory / f"{stem}.bin")
    raise FileNotFoundError(f"{directory}: none of {[s + '.safetensors' for s in stems]} (or .bin) found")


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (expected the hart-0.7b-1024px layout: llm/ and tokenizer/)")
    return json.loads(path.read_text())


def transformer_config(d: dict, cvae: int, vocab: int) -> HARTConfig:
    """HARTConfig from `llm/config.json`; refuses options of HARTForT2I this port does not implement."""
    unsupported = {"attn_type": "llama", "mlp_type": "llama", "disable_aln": False, "use_timestep_embed": False,
                   "use_cross_attn": False, "sep_aln_pooling_mode": "max", "shared_aln": False}
    bad = {k: d[k] for k, want in unsupported.items() if k in d and d[k] != want}
    if bad:
        raise ValueError(f"llm/config.json uses options this port does not implement: {bad}")
    steps = d.get("num_sampling_steps", "8")
    if not str(steps).isdigit():
        raise ValueError(f"num_sampling_steps={steps!r}: only a plain step count is supported")
    return HARTConfig(
        embed_dim=d["embed_dim"], depth=d["depth"], num_heads=d["num_heads"], mlp_ratio=d.get("mlp_ratio", 4.0),
        norm_eps=d.get("norm_eps", 1e-6), context_token=d["context_token"], context_dim=d["context_dim"],
        vocab_size=vocab, cvae=cvae, patch_nums=tuple(d["patch_nums"]), attn_l2_norm=d.get("attn_l2_norm", False),
        use_context_norm=d.get("use_context_norm", False), context_norm_scale=d.get("context_norm_scale", 1.0),
        cond_drop_rate=d.get("cond_drop_rate", 0.1), diff_width=d.get("diff_width", 1024),
        diff_depth=d.get("diff_depth", 6), num_sampling_steps=int(steps),
        diffusion_batch_mul=d.get("diffusion_batch_mul", 4),
    )


def tokenizer_config(d: dict, patch_nums: tuple[int, ...]) -> TokenizerConfig:
    """TokenizerConfig from `tokenizer/config.json`; the scale list is the transformer's (as in the reference)."""
    if d.get("using_znorm", False):
        raise ValueError("tokenizer/config.json: using_znorm=True is not implemented")
    if d.get("quantizer_type", "var_hybrid") != "var_hybrid" or not d.get("hybrid", True):
        raise ValueError(f"tokenizer/config.json: quantizer_type={d.get('quantizer_type')!r}, "
                         f"hybrid={d.get('hybrid')!r}; only the released hybrid quantizer ('var_hybrid') is "
                         "implemented")
    if d.get("share_quant_resi", 4) < 2 or d.get("default_qresi_counts", 0):
        raise ValueError("tokenizer/config.json: only partially shared Phi (share_quant_resi >= 2) is implemented")
    return TokenizerConfig(
        vocab_size=d.get("vocab_size", 4096), z_channels=d.get("z_channels", 32), ch=d.get("ch", 160),
        ch_mult=tuple(d.get("ch_mult", (1, 1, 2, 2, 4))), quant_conv_ks=d.get("quant_conv_ks", 3),
        quant_resi=d.get("quant_resi", 0.5), share_quant_resi=d.get("share_quant_resi", 4),
        beta=d.get("beta", 0.25), patch_nums=tuple(patch_nums),
        # not in the released config (fixed there); read when present so small test/tiny checkpoints can load
        num_res_blocks=d.get("num_res_blocks", 2), norm_groups=d.get("norm_groups", 32),
    )


def resolve_dirs(path: str | Path) -> tuple[Path, Path]:
    """(llm dir, tokenizer dir) from either the model root or its `llm/` folder (or `hf:<owner>/<repo>`)."""
    p = hub.resolve(path)
    if not p.is_dir():
        raise FileNotFoundError(f"HART checkpoint directory {p} does not exist")
    if not (p / "llm").is_dir() and not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} is not a HART checkpoint: expected llm/ and tokenizer/ folders in it (the "
                                f"hart-0.7b-1024px layout), or pass its llm/ folder")
    llm = p / "llm" if (p / "llm").is_dir() else p
    tok = llm.parent / "tokenizer"
    if not tok.is_dir():
        raise FileNotFoundError(f"{tok} not found: the tokenizer must sit next to llm/ (hart-0.7b-1024px layout)")
    return llm, tok


def load_hart(path: str | Path, use_ema: bool = True, dtype=jnp.float32):
    """Returns (HARTTransformer, HARTTokenizer) with the released weights (EMA weights when present).

    `dtype`: compute and weight dtype of the transformer (`HARTTransformer(dtype=, param_dtype=)`; its norm weights
    and level embedding stay float32) and of the tokenizer's autoencoder (`HARTTokenizer(dtype=, param_dtype=)`;
    its GroupNorm weights and the quantizer stay float32)."""
    llm_dir, tok_dir = resolve_dirs(path)
    llm_cfg = _read_json(llm_dir / "config.json")
    tok_raw = _read_json(tok_dir / "config.json")
    tcfg = tokenizer_config(tok_raw, tuple(llm_cfg["patch_nums"]))
    cfg = transformer_config(llm_cfg, tcfg.z_channels, tcfg.vocab_size)
    stems = ("ema_model", "model", "pytorch_model") if use_ema else ("model", "pytorch_model")
    tensors, used = read_weights(llm_dir, stems)
    model = load_into(nnx.eval_shape(lambda: HARTTransformer(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)),
                      tensors, "transformer", used, dtype=None)
    tok_tensors, tok_used = read_weights(tok_dir, ("model", "pytorch_model"))
    tok = load_into(nnx.eval_shape(lambda: HARTTokenizer(tcfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)),
                    tok_tensors, "tokenizer", tok_used, dtype=None)
    return model, tok


def with_dtype(module, dtype):
    """The same weights in a module of the same class and config built with `dtype=param_dtype=dtype` (a
    HARTTransformer or HARTTokenizer): each parameter is cast to that module's own dtype, so the float32 ones
    (norm weights, level embedding, the tokenizer's quantizer) stay float32. E.g. a float32 and a bfloat16 copy of
    one checkpoint for a precision comparison."""
    g, abstract = nnx.split(nnx.eval_shape(lambda: type(module)(module.cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                                                param_dtype=dtype)))
    return nnx.merge(g, jax.tree.map(lambda x, ref: x.astype(ref.dtype), nnx.state(module), abstract))


def official_state_dict(module, kind: str) -> dict[str, np.ndarray]:
    """Every parameter of a HARTTransformer / HARTTokenizer under its official key, in torch layout, float32."""
    levels = len(module.cfg.ch_mult) if kind == "tokenizer" else 0
    out = {}
    for path, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(module, nnx.Param))).items():
        arr = np.asarray(jnp.asarray(v, jnp.float32))
        out[official_key(path, kind, levels)] = np.ascontiguousarray(to_torch(arr, str(path[-1])))
    return out


def save_hart(model: HARTTransformer, tok: HARTTokenizer, directory: str | Path) -> Path:
    """Write `directory/{llm,tokenizer}/{config.json, model.safetensors}` in the hart-0.7b-1024px layout (the keys
    and config fields `load_hart` reads; float32), e.g. random full-size weights for timing jaxeff and the
    official code on the same weights. Returns `directory`; refuses a directory that already has an llm/."""
    root = Path(directory)
    if (root / "llm").exists():
        raise FileExistsError(f"{root / 'llm'} exists; give an empty directory")
    c, t = model.cfg, tok.cfg
    llm = {"architectures": ["HARTForT2I"], "model_type": "hart_transformer_t2i", "attn_type": "llama",
           "mlp_type": "llama",
           **{k: getattr(c, k) for k in ("embed_dim", "depth", "num_heads", "mlp_ratio", "norm_eps", "context_token",
                                         "context_dim", "attn_l2_norm", "use_context_norm", "context_norm_scale",
                                         "cond_drop_rate", "diff_width", "diff_depth", "diffusion_batch_mul")},
           "patch_nums": list(c.patch_nums), "num_sampling_steps": str(c.num_sampling_steps)}
    # the released tokenizer's quantizer fields: the official code picks its quantizer class by them
    tokc = {"architectures": ["HARTAutoEncoderWithDisc"], "model_type": "hart_autoencoder_with_disc",
            "quantizer_type": "var_hybrid", "hybrid": True, "v_patch_nums": list(t.patch_nums),
            "ch_mult": list(t.ch_mult),
            **{k: getattr(t, k) for k in ("vocab_size", "z_channels", "ch", "quant_conv_ks", "quant_resi",
                                          "share_quant_resi", "beta", "num_res_blocks", "norm_groups")}}
    for sub, cfg, module, kind in (("llm", llm, model, "transformer"), ("tokenizer", tokc, tok, "tokenizer")):
        (root / sub).mkdir(parents=True)
        (root / sub / "config.json").write_text(json.dumps(cfg, indent=1))
        save_file(official_state_dict(module, kind), root / sub / "model.safetensors")
    return root


__all__ = ["CheckpointMismatchError", "load_hart", "save_hart", "with_dtype", "official_state_dict", "load_into",
           "official_key", "bin_to_numpy", "convert_bin_dir", "load_file"]
