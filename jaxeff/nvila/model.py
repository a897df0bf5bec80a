"""The NVILA vision-language model on the shared SigLIP ViT and Qwen2 decoder, and its released-checkpoint loader.

Official behaviour (NVlabs/VILA at b760c34, file:line in ../shared/reference/nvila.md):
- Tower: SigLIP, features of `hidden_states[-2]` (before the last layer and `post_layernorm`), all tokens.
- One image in the prompt: Dynamic-S2 (NVILA, `image_aspect_ratio == "dynamic_s2"`) or dynamic tiling with each
  tile its own `<image>` (NVILA-Lite, `"dynamic"`); several images or video frames: one 448 tile each, with the
  features repeated along channels up to the projector's width (`llava_arch.py:306-312, 859-877`).
- Every image, tile and frame group is followed by the embedding of the text "\\n" (`BasicImageEncoder`,
  `BasicVideoEncoder` / `TSPVideoEncoder` `end_tokens`).
- Video: every frame one tile -> projector -> mean over `video_pool` consecutive frames (TSP `pool_sizes
  [[p, 1, 1]]`, NVILA-8B-Video p = 8; 1 = `BasicVideoEncoder`). The official `view(-1, p)` rejects frame counts
  that are not a multiple of p; here the last group averages only its real frames (identical whenever the
  official code runs).
- Media tokens (`<image>`, `<vila/video>`, `<vila/sentinel>`) are added to the tokenizer beyond the checkpoint's
  embedding rows; their ids are never looked up (media positions are replaced by visual features).
- Chat: the tokenizer's saved chat template, else the training template `--chat_template qwen2` (system prompt
  without a final period); user content = media tokens followed by the text (`generate_content`).
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from jaxeff.io import hub, load_checkpoint_dir
from jaxeff.io.hf import load_config as load_llm_config
from jaxeff.io.hf import load_state_dict_into
from jaxeff.io.state_dict import load_mapped, to_torch, torch_key, torch_layout
from jaxeff.models.llama import Llama, LlamaConfig, SamplingConfig, stop_id_tuple
from jaxeff.models.llama import generate as llm_generate
from jaxeff.models.vit import ViT, ViTConfig, temporal_pool
from jaxeff.nvila import features as F
from jaxeff.nvila import tiling
from jaxeff.nvila.projector import load_projector_state, make_projector

IMAGE_TOKEN, VIDEO_TOKEN, SENTINEL_TOKEN = "<image>", "<vila/video>", "<vila/sentinel>"
MEDIA_TOKENS = (SENTINEL_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN)  # the order VILA adds them (ids 151648, 151649, 151650)
CHAT_TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n"
                 "<|im_start|>assistant\n")
GREEDY = SamplingConfig()
ASPECT_MODES = ("dynamic_s2", "dynamic", "resize")


@dataclasses.dataclass(frozen=True)
class NVILAConfig:
    vision: ViTConfig
    llm: LlamaConfig
    projector_type: str = "mlp_downsample"
    mm_hidden_size: int = 3456  # projector input width: 3 x 1152 after the Dynamic-S2 scale concatenation
    select_layer: int = -2
    image_aspect_ratio: str = "dynamic_s2"  # "dynamic_s2" (NVILA), "dynamic" (NVILA-Lite) or "resize"
    s2_scales: tuple[int, ...] = (448, 896, 1344)
    min_tiles: int = 1
    max_tiles: int = 12
    video_pool: int = 1  # TSP temporal pool (8 for NVILA-8B-Video); 1 = every frame kept

    def __post_init__(self):
        if self.image_aspect_ratio not in ASPECT_MODES:
            raise ValueError(f"image_aspect_ratio {self.image_aspect_ratio!r} not supported; supported: {ASPECT_MODES}")
        if self.image_aspect_ratio == "dynamic_s2" and self.s2_scales[0] != self.vision.image_size:
            raise ValueError(f"the first S2 scale {self.s2_scales[0]} must be the tower's image size "
                             f"{self.vision.image_size}")
        if self.mm_hidden_size % self.vision.hidden_size:
            raise ValueError(f"mm_hidden_size {self.mm_hidden_size} is not a multiple of the tower width "
                             f"{self.vision.hidden_size}")
        if self.video_pool < 1:
            raise ValueError(f"video_pool must be >= 1, got {self.video_pool}")

    @property
    def channel_repeat(self) -> int:
        """How many copies of the tower features one single-tile image feeds the projector (3 for NVILA)."""
        return self.mm_hidden_size // self.vision.hidden_size

    @classmethod
    def from_dirs(cls, top: dict, vision: ViTConfig, llm: LlamaConfig, projector_type: str) -> NVILAConfig:
        """From the released top-level config.json dict plus the sub-folders' configs."""
        feature = top.get("mm_vision_select_feature", "cls_patch")
        if feature != "cls_patch":
            raise ValueError(f"mm_vision_select_feature {feature!r} not supported (NVILA uses 'cls_patch': all "
                             f"SigLIP tokens)")
        mode = top.get("image_aspect_ratio", "resize")
        if top.get("dynamic_s2"):
            mode = "dynamic_s2"
        scales = top.get("s2_scales") or "448,896,1344"
        scales = tuple(int(s) for s in scales.split(",")) if isinstance(scales, str) else tuple(scales)
        return cls(vision=vision, llm=llm, projector_type=projector_type,
                   mm_hidden_size=top.get("mm_hidden_size", vision.hidden_size * (3 if mode == "dynamic_s2" else 1)),
                   select_layer=top.get("mm_vision_select_layer", -2), image_aspect_ratio=mode, s2_scales=scales,
                   min_tiles=top.get("min_tiles", 1), max_tiles=top.get("max_tiles", 12),
                   video_pool=_video_pool(top.get("video_encoder")))


def _video_pool(encoder) -> int:
    """Temporal pool size from the config's `video_encoder` (absent / BasicVideoEncoder: 1; TSPVideoEncoder with
    pool_sizes [[p, 1, 1]]: p)."""
    if encoder is None:
        return 1
    if isinstance(encoder, str):
        encoder = json.loads(encoder)
    target = encoder.get("_target_", "")
    if target.endswith("BasicVideoEncoder"):
        return 1
    sizes = encoder.get("pool_sizes")
    if target.endswith("TSPVideoEncoder") and sizes and len(sizes) == 1 and list(sizes[0][1:]) == [1, 1]:
        return int(sizes[0][0])
    raise ValueError(f"video_encoder {encoder} not supported (BasicVideoEncoder or TSP with one [p, 1, 1] pool)")


class NVILAModel(nnx.Module):
    """The weights: `vision_tower` (SigLIP ViT), `mm_projector`, `llm` (Qwen2)."""

    def __init__(self, cfg: NVILAConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = cfg
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.vision_tower = ViT(cfg.vision, **kw)
        self.mm_projector = make_projector(cfg.projector_type, cfg.mm_hidden_size, cfg.llm.hidden_size,
                                           cfg.vision.grid_size, **kw)
        self.llm = Llama(cfg.llm, **kw)


@partial(jax.jit, static_argnames=("graphdef", "block_size", "repeat"))
def _encode_jit(graphdef, state, pixels, *, block_size, repeat):
    """pixels [n, s, s, 3] -> Dynamic-S2 tokens [rows*cols*p*p, D] (block_size given) or [n, p*p, D]."""
    model = nnx.merge(graphdef, state)
    cfg = model.config
    feats = model.vision_tower(pixels.astype(model.llm.dtype), select_layer=cfg.select_layer)
    if block_size is None:
        return F.encode_single_tile(feats, model.mm_projector, repeat)
    return F.encode_dynamic_s2(feats, block_size, model.mm_projector, cfg.s2_scales)


def encode_tiles(model: NVILAModel, pixels, block_size: tuple[int, int] | None = None) -> jnp.ndarray:
    """SigLIP pixels [n, s, s, 3] -> visual tokens: Dynamic-S2 [rows*cols*p*p, D] for one image's tiles with its
    `block_size`, else [n, p*p, D] for n single-tile images / frames (features repeated up to the projector's
    width)."""
    graphdef, state = nnx.split(model)
    repeat = model.config.channel_repeat if block_size is None else 1
    return _encode_jit(graphdef, state, jnp.asarray(pixels), block_size=block_size, repeat=repeat)


@dataclasses.dataclass
class Prompt:
    """A prompt ready for the LLM: `embeds` [1, S, D]; `kinds` [S] str per position ("text", "image", "video",
    "end" for the "\\n" after each media group) for inspection."""

    embeds: jnp.ndarray
    kinds: list[str]


class NVILA:
    """`NVILA(model, tokenizer).generate(images, prompt)`; built by `from_pretrained`."""

    def __init__(self, model: NVILAModel, tokenizer):
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        missing = [t for t in MEDIA_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
        self.media_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in MEDIA_TOKENS}
        self.end_ids = tokenizer("\n", add_special_tokens=False).input_ids
        vocab = self.config.llm.vocab_size
        if any(i >= vocab for i in self.end_ids):
            raise ValueError(f"the tokenizer's '\\n' ids {self.end_ids} are beyond the embedding table ({vocab})")

    # ---- vision
    def encode_tiles(self, pixels, block_size: tuple[int, int] | None = None) -> jnp.ndarray:
        return encode_tiles(self.model, pixels, block_size)

    def image_groups(self, images) -> list[jnp.ndarray]:
        """Images -> one [tokens, D] array per `<image>` of the prompt (Lite: one per tile)."""
        cfg, size = self.config, self.config.vision.image_size
        if len(images) == 1 and cfg.image_aspect_ratio == "dynamic_s2":
            tiles, block = tiling.dynamic_s2_tiles(images[0], cfg.s2_scales, cfg.max_tiles)
            return [self.encode_tiles(tiling.siglip_pixels(tiles), block)]
        if len(images) == 1 and cfg.image_aspect_ratio == "dynamic":
            tiles, _ = tiling.dynamic_tiles(images[0], cfg.min_tiles, cfg.max_tiles, size)
            return list(self.encode_tiles(tiling.siglip_pixels(tiles)))
        pixels = np.concatenate([tiling.siglip_preprocess(im, size) for im in images])
        return list(self.encode_tiles(pixels))

    def video_groups(self, frames) -> list[jnp.ndarray]:
        """Frames (uint8 [F, H, W, 3] or a list of images) -> one [tokens, D] array per pooled frame group."""
        size, pool = self.config.vision.image_size, self.config.video_pool
        if len(frames) == 0:
            raise ValueError("a video needs at least one frame")
        feats = self.encode_tiles(np.concatenate([tiling.siglip_preprocess(f, size) for f in frames]))
        pooled, _ = temporal_pool(feats[None], jnp.ones((1, len(frames)), bool), pool)
        return list(pooled[0])

    # ---- prompt
    def chat_text(self, content: str) -> str:
        """One user turn + the assistant header: the template saved with the tokenizer (`llm/tokenizer_config.json`,
        what the released configs' `chat_template: null` selects), else VILA's qwen2 training template."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=True)
        return CHAT_TEMPLATE.format(content=content)

    def build_prompt(self, prompt: str, images=(), video=None) -> Prompt:
        """Chat-templated prompt with media -> LLM input embeddings. Media tokens go before the text; each image /
        tile / frame group's tokens are followed by the "\\n" embedding."""
        images = list(images)
        if images and video is not None:
            raise ValueError("pass images or a video, not both")
        # one entry per media token of the prompt, each a list of token groups that each end with "\n"
        if video is not None:
            items, kind, content = [self.video_groups(video)], "video", VIDEO_TOKEN
        else:
            groups, kind = (self.image_groups(images) if images else []), "image"
            items = [[x] for x in groups]
            if len(images) == 1 and self.config.image_aspect_ratio == "dynamic":
                content = (IMAGE_TOKEN + "\n") * len(groups)  # Lite: "<image>\n" per tile (llava_arch.py:863-867)
            else:
                content = IMAGE_TOKEN * len(images)
        ids = self.tokenizer(self.chat_text(content + prompt), add_special_tokens=False).input_ids
        vocab = self.config.llm.vocab_size
        media = {self.media_ids[IMAGE_TOKEN], self.media_ids[VIDEO_TOKEN]}
        bad = sorted({i for i in ids if i >= vocab and i not in media})
        if bad:
            raise ValueError(f"prompt token ids {bad} are beyond the embedding table ({vocab} rows) and not media "
                             f"tokens (the text contains {SENTINEL_TOKEN!r}?)")
        n_media = sum(i in media for i in ids)
        if n_media != len(items):
            raise ValueError(f"the prompt has {n_media} media tokens for {len(items)} media items (the text must "
                             f"not contain {IMAGE_TOKEN!r} or {VIDEO_TOKEN!r})")
        llm = self.model.llm
        # media ids are clamped to row 0 for the lookup and then replaced: nothing is read outside the table
        text = llm.embed_tokens(jnp.asarray(np.where(np.asarray(ids) < vocab, ids, 0), jnp.int32))
        end = llm.embed_tokens(jnp.asarray(self.end_ids, jnp.int32))
        pieces, kinds, start = [], [], 0
        media_pos = [pos for pos, i in enumerate(ids) if i in media]
        for pos, groups in zip(media_pos + [len(ids)], items + [[]]):
            pieces.append(text[start:pos])
            kinds += ["text"] * (pos - start)
            for group in groups:
                pieces += [group.astype(text.dtype), end]
                kinds += [kind] * group.shape[0] + ["end"] * end.shape[0]
            start = pos + 1
        return Prompt(embeds=jnp.concatenate(pieces)[None], kinds=kinds)

    # ---- generation
    def stop_ids(self) -> tuple[int, ...]:
        """`<|im_end|>`, the tokenizer's eos and every id of the LLM config's `eos_token_id` (one id or a list)
        that lies inside the vocabulary."""
        ids = (self.tokenizer.convert_tokens_to_ids("<|im_end|>"), *stop_id_tuple(self.tokenizer.eos_token_id),
               *stop_id_tuple(self.config.llm.eos_token_id))
        vocab = self.config.llm.vocab_size
        return tuple(dict.fromkeys(i for i in ids if isinstance(i, int) and 0 <= i < vocab))

    def generate_ids(self, prompt: Prompt, max_new_tokens: int = 64, sampling: SamplingConfig = GREEDY,
                     seed: int = 0) -> np.ndarray:
        """Token ids generated after `prompt` (stops at `<|im_end|>` / eos, which is included): the shared
        decoder's `generate` from the prompt embeddings."""
        stop = self.stop_ids()
        if not stop:
            raise ValueError("the tokenizer has no <|im_end|> or eos token inside the vocabulary")
        out = llm_generate(self.model.llm, None, max_new_tokens, inputs_embeds=prompt.embeds, sampling=sampling,
                       eos_id=stop, seed=seed)
        return out.tokens[0, : out.num_generated[0]]

    def generate(self, images=(), prompt: str = "", *, video=None, max_new_tokens: int = 64,
                 sampling: SamplingConfig = GREEDY, seed: int = 0) -> str:
        """Answer `prompt` about `images` (PIL images or uint8 [H, W, 3] arrays; one image uses Dynamic-S2 /
        Lite tiling) or a `video` (frames); greedy by default."""
        if isinstance(images, np.ndarray) and images.ndim == 3 or not isinstance(images, (list, tuple, np.ndarray)):
            images = [images]
        ids = self.generate_ids(self.build_prompt(prompt, images, video), max_new_tokens, sampling, seed)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------------------------------------------
# Loading the released layout


def siglip_config(d: dict) -> ViTConfig:
    """HF SiglipVisionConfig (or a SiglipConfig with `vision_config`) dict -> ViTConfig."""
    d = d.get("vision_config", d)
    act = d.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"SigLIP hidden_act {act!r} not supported (the ViT uses gelu_pytorch_tanh)")
    return ViTConfig(image_size=d["image_size"], patch_size=d["patch_size"], num_channels=d.get("num_channels", 3),
                     hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                     num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
                     layer_norm_eps=d.get("layer_norm_eps", 1e-6))


def load_siglip_state(vit: ViT, tensors: dict[str, np.ndarray], source: str = "vision_tower") -> ViT:
    """Fill `vit` in place from a HF `SiglipVisionModel` state dict (keys with or without the `vision_model.`
    prefix; the pooling head, unused by NVILA, is ignored); raises naming missing, unexpected or mis-shaped keys."""
    tensors = {k.removeprefix("vision_model."): v for k, v in tensors.items()}
    # our ViT paths are the HF SiglipVisionModel names (without `vision_model.`)
    return load_mapped(vit, tensors, lambda p: (torch_key(p), torch_layout(p)), source=source,
                       what="the SigLIP tower", ignore=lambda k: k.startswith("head."))


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing (expected the released NVILA layout: config.json, llm/, "
                                f"vision_tower/, mm_projector/)")
    return json.loads(path.read_text())


def siglip_state_dict(vit: ViT) -> dict[str, np.ndarray]:
    """HF `SiglipVisionModel` state dict (`vision_model.` keys, torch layouts) of `vit`: the inverse of
    `load_siglip_state`."""
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(vit, nnx.Param)))
    return {"vision_model." + torch_key(p): np.ascontiguousarray(to_torch(np.asarray(v), str(p[-1])))
            for p, v in flat.items()}


def released_config(cfg: NVILAConfig) -> tuple[dict, dict]:
    """(top-level config.json, vision_tower/config.json) dicts of the released layout for `cfg`."""
    v = cfg.vision
    vision = {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
              "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": v.num_channels,
              "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
              "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
              "layer_norm_eps": v.layer_norm_eps, "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False}
    top = {"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "mm_hidden_size": cfg.mm_hidden_size,
           "hidden_size": cfg.llm.hidden_size, "mm_vision_select_layer": cfg.select_layer,
           "mm_vision_select_feature": "cls_patch", "image_aspect_ratio": cfg.image_aspect_ratio,
           "dynamic_s2": cfg.image_aspect_ratio == "dynamic_s2", "s2_scales": ",".join(map(str, cfg.s2_scales)),
           "min_tiles": cfg.min_tiles, "max_tiles": cfg.max_tiles}
    if cfg.video_pool > 1:
        top["video_encoder"] = {"_target_": "llava.model.encoders.TSPVideoEncoder",
                                "pool_sizes": [[cfg.video_pool, 1, 1]]}
    return top, vision


def save_pretrained(nvila: NVILA, directory: str | Path) -> Path:
    """Write `nvila` in the released layout that `from_pretrained` reads (config.json; llm/ as HF Qwen2 + the
    tokenizer; vision_tower/ as HF SiglipVisionModel; mm_projector/ with the official `layers.N` keys)."""
    from jaxeff.io import save_file
    from jaxeff.io.hf import save_pretrained as save_llm
    from jaxeff.nvila.projector import projector_state_dict

    root, model = Path(directory), nvila.model
    top, vision = released_config(model.config)
    save_llm(model.llm, root / "llm")
    nvila.tokenizer.save_pretrained(root / "llm")
    for sub, tensors, cfg in (("vision_tower", siglip_state_dict(model.vision_tower), vision),
                              ("mm_projector", projector_state_dict(model.mm_projector),
                               {"mm_projector_type": model.config.projector_type, "model_type": "v2l_projector"})):
        (root / sub).mkdir(parents=True, exist_ok=True)
        save_file(tensors, root / sub / "model.safetensors")
        (root / sub / "config.json").write_text(json.dumps(cfg, indent=2))
    (root / "config.json").write_text(json.dumps(top, indent=2))
    return root


def from_pretrained(directory: str | Path, dtype=jnp.bfloat16) -> NVILA:
    """Load a released NVILA / NVILA-Lite folder (config.json, llm/, vision_tower/, mm_projector/, safetensors)
    or `"hf:<repo id>"` (downloaded by `jaxeff.io.hub.resolve`, errors as documented there) with parameters in
    `dtype` (the release is bf16)."""
    directory = str(directory)
    root = hub.resolve(directory)
    top = _read_json(root / "config.json")
    vision = siglip_config(_read_json(root / "vision_tower" / "config.json"))
    projector_type = _read_json(root / "mm_projector" / "config.json").get("mm_projector_type")
    cfg = NVILAConfig.from_dirs(top, vision, load_llm_config(root / "llm"), projector_type)
    model = nnx.eval_shape(lambda: NVILAModel(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
    load_siglip_state(model.vision_tower, load_checkpoint_dir(root / "vision_tower"), str(root / "vision_tower"))
    load_projector_state(model.mm_projector, load_checkpoint_dir(root / "mm_projector"), str(root / "mm_projector"))
    model.llm = load_state_dict_into(model.llm, load_checkpoint_dir(root / "llm"), source=str(root / "llm"))

    from transformers import AutoTokenizer

    return NVILA(model, AutoTokenizer.from_pretrained(root / "llm"))
