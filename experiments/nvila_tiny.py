"""nvila_tiny: a tiny VLM trained here on synthetic image questions, to see NVILA's "scale then compress" at toy
scale: accuracy vs token compression (none / 2x2 / 3x3) with and without (Dynamic-)S2, at equal LLM tokens.

Data (rendered with Pillow, seeded): a 64x64 image on a noisy grey background with 1-4 small objects (about 6 px:
circle / square / triangle, each a different one of red / green / blue / yellow colours). Three question types,
each answered by one token:
- shape: "what shape is the <colour> object ?" (circle / square / triangle): needs the object's detail, lost when
  the whole image is squashed to one 32-pixel tile (objects ~3 px there);
- count: "how many objects ?" (1-4);
- colour: "is there a <colour> object ?" (yes / no): visible at any resolution.

Model (all from jaxeff): SigLIP-style ViT (`jaxeff.models.vit`, 32-pixel tiles, 4-pixel patches = 8x8 tokens,
features of layer -2) -> the shared VILA projector (`DownsampleProjector`: merge 1 = "none" (LN-MLP), 2x2
(`mlp_downsample`), 3x3 with the middle block (`mlp_downsample_3x3_fix`)) -> a small Qwen2 decoder fed
[visual tokens, question tokens]; the answer is the argmax of the LM head at the last position, trained with
cross-entropy on that token. Visual input modes:
- `low`: one 32-pixel tile of the whole image (NVILA's single-tile path);
- `s2`: S2 with scales 32 / 64 (`jaxeff.nvila.tiling.dynamic_s2_tiles`: 1 + 4 tiles; square images so the last
  grid is 2x2), the two scales' maps area-resized and channel-concatenated and projected per tile
  (`jaxeff.nvila.features.encode_dynamic_s2`), as NVILA does.
Visual LLM tokens per image: low none 64, low 2x2 16, low 3x3 9; S2 none 256, S2 2x2 64, S2 3x3 36. The
equal-token comparison is `low, none` vs `s2, 2x2` (64 each): the paper's claim is that scaling up the resolution
and then compressing beats the low-resolution image at the same LLM cost.

`make exp name=nvila_tiny` (smoke: a few minutes on a 2-core CPU) or `preset=full` (more data and steps).

Data parallel over `Run.mesh`: replicated parameters and optimiser state; every process renders the same data set
and draws the same global batch of `batch_size`, feeding its rows (`Run.data_mesh`); evaluation feeds numpy
batches to the replicated model, and process 0 writes. Run on: 1 CPU device; 4 of 8 CPU devices in one process
(tests/multidevice/test_mesh_experiments.py, tiny sizes: the one-device loss and accuracy); 2 processes x 2 CPU
devices on one machine (by hand, tiny sizes).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image, ImageDraw

from jaxeff.distributed import shard_global_batch, to_host
from jaxeff.experiment import Run, register
from jaxeff.models.llama import Llama, LlamaConfig
from jaxeff.models.vit import DownsampleProjector, ViT, ViTConfig
from jaxeff.nvila import features as F
from jaxeff.nvila.tiling import dynamic_s2_tiles, siglip_pixels
from jaxeff.train import OptimConfig, init_train_state, make_optimizer, make_train_step, merge

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = ("shape", "count", "colour")
WORDS = ("<pad>", "what", "shape", "is", "the", "object", "?", "how", "many", "objects", "there", "a",
         *COLOURS, *SHAPES, "1", "2", "3", "4", "yes", "no")
VOCAB = {w: i for i, w in enumerate(WORDS)}
Q_LEN = 7  # the longest question; shorter ones are left-padded so the answer is always read at the last position
MODES = {"low-none": ("low", 1), "low-2x2": ("low", 2), "low-3x3": ("low", 3),
         "s2-none": ("s2", 1), "s2-2x2": ("s2", 2), "s2-3x3": ("s2", 3)}
TILE, PATCH, IMAGE = 32, 4, 64
SCALES = (TILE, IMAGE)


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    modes: tuple[str, ...] = tuple(MODES)
    train_images: int = 4096
    eval_images: int = 512
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3  # 3e-3 had not learned to read the image after 800 steps (batch 32); 1e-3 had by 1000
    warmup_steps: int = 50
    vit_hidden: int = 48
    vit_layers: int = 3  # layer -2 is used: 2 layers run
    llm_hidden: int = 64
    llm_layers: int = 2
    eval_every: int = 200

    def validate(self):
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"unknown modes {bad}; modes: {list(MODES)}")
        if min(self.train_images, self.eval_images, self.steps, self.batch_size) < 1:
            raise ValueError("train_images, eval_images, steps and batch_size must be >= 1")


# ---------------------------------------------------------------------------------------------------------------
# data


def render(rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """One uint8 [64, 64, 3] image (drawn 4x larger, then box-downsampled: anti-aliased edges) and its objects
    [(colour, shape)], each colour at most once, objects not overlapping."""
    up = 4
    bg = rng.integers(120, 170)
    noise = rng.normal(0, 12, (IMAGE, IMAGE, 1)).repeat(up, 0).repeat(up, 1)
    canvas = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8).repeat(3, 2), "RGB")
    draw = ImageDraw.Draw(canvas)
    n = int(rng.integers(1, 5))
    colours = rng.choice(list(COLOURS), n, replace=False)
    objects, centres = [], []
    while len(objects) < n:
        c = rng.uniform(6, IMAGE - 6, 2)
        if any(np.abs(c - o).max() < 9 for o in centres):
            continue
        centres.append(c)
        colour, shape = str(colours[len(objects)]), str(rng.choice(SHAPES))
        x, y, r = c[0] * up, c[1] * up, rng.uniform(2.6, 3.4) * up
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif shape == "square":
            s = r * 0.88
            draw.rectangle([x - s, y - s, x + s, y + s], fill=fill)
        else:
            draw.polygon([(x, y - r * 1.15), (x - r * 1.1, y + r * 0.85), (x + r * 1.1, y + r * 0.85)], fill=fill)
        objects.append((colour, shape))
    return np.asarray(canvas.resize((IMAGE, IMAGE), Image.BOX)), objects


def question(rng: np.random.Generator, kind: str, objects) -> tuple[list[str], str]:
    if kind == "shape":
        colour, shape = objects[int(rng.integers(len(objects)))]
        return ["what", "shape", "is", "the", colour, "object", "?"], shape
    if kind == "count":
        return ["how", "many", "objects", "?"], str(len(objects))
    colour = str(rng.choice(list(COLOURS)))
    return ["is", "there", "a", colour, "object", "?"], "yes" if colour in {c for c, _ in objects} else "no"


def make_dataset(n: int, seed: int) -> dict[str, np.ndarray]:
    """tiles uint8 [n, 5, 32, 32, 3] (S2: the whole image at 32, then the 2x2 tiles of the 64 image; tile 0 is the
    low-resolution input), question ids [n, Q_LEN], answer id [n], question kind [n] (index into QUESTIONS)."""
    rng = np.random.default_rng(seed)
    tiles, qs, answers, kinds = [], [], [], []
    for i in range(n):
        image, objects = render(rng)
        t, block = dynamic_s2_tiles(image, SCALES, max_tiles=4)
        assert block == (2, 2)
        kind = i % len(QUESTIONS)
        words, answer = question(rng, QUESTIONS[kind], objects)
        tiles.append(t)
        qs.append([0] * (Q_LEN - len(words)) + [VOCAB[w] for w in words])
        answers.append(VOCAB[answer])
        kinds.append(kind)
    return {"tiles": np.stack(tiles), "question": np.asarray(qs, np.int32), "answer": np.asarray(answers, np.int32),
            "kind": np.asarray(kinds, np.int32)}


# ---------------------------------------------------------------------------------------------------------------
# model


class TinyVLM(nnx.Module):
    """ViT (layer -2) -> VILA projector (low: one tile; s2: S2 scale merge, per-tile projection) -> Qwen2 decoder."""

    def __init__(self, cfg: Config, mode: str, *, rngs: nnx.Rngs):
        self.input, merge = MODES[mode]
        vit = ViTConfig(image_size=TILE, patch_size=PATCH, hidden_size=cfg.vit_hidden,
                        intermediate_size=2 * cfg.vit_hidden, num_hidden_layers=cfg.vit_layers,
                        num_attention_heads=cfg.vit_hidden // 16)
        self.vision = ViT(vit, rngs=rngs)
        mm = cfg.vit_hidden * (len(SCALES) if self.input == "s2" else 1)
        self.projector = DownsampleProjector(mm, cfg.llm_hidden, vit.grid_size, merge,
                                             mid_dim=3 * mm if merge == 3 else None, rngs=rngs)
        llm = LlamaConfig(vocab_size=len(WORDS), hidden_size=cfg.llm_hidden, intermediate_size=2 * cfg.llm_hidden,
                          num_hidden_layers=cfg.llm_layers, num_attention_heads=cfg.llm_hidden // 16,
                          num_key_value_heads=cfg.llm_hidden // 32, model_type="qwen2", attention_bias=True)
        self.llm = Llama(llm, rngs=rngs)

    def visual_tokens(self, pixels):
        """pixels [B, 5, 32, 32, 3] in [-1, 1] -> [B, T, llm_hidden]."""
        b = pixels.shape[0]
        if self.input == "low":
            return self.projector(self.vision(pixels[:, 0], select_layer=-2))
        feats = self.vision(pixels.reshape(-1, *pixels.shape[2:]), select_layer=-2)
        feats = feats.reshape(b, pixels.shape[1], *feats.shape[1:])
        return jax.vmap(lambda f: F.encode_dynamic_s2(f, (2, 2), self.projector, SCALES))(feats)

    def __call__(self, pixels, question):
        """-> answer logits [B, vocab] at the last question position."""
        x = jnp.concatenate([self.visual_tokens(pixels), self.llm.embed_tokens(question)], axis=1)
        return self.llm(None, inputs_embeds=x)[:, -1]


def loss_fn(model: TinyVLM, batch):
    logits = model(batch["pixels"], batch["question"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["answer"]).mean()
    return loss, {"acc": (logits.argmax(-1) == batch["answer"]).mean()}


def to_batch(data: dict, idx: np.ndarray) -> dict:
    """Host (numpy) arrays of examples `idx`: jit takes them as replicated inputs, `shard_global_batch` splits them."""
    return {"pixels": np.asarray(siglip_pixels(data["tiles"][idx])), "question": data["question"][idx],
            "answer": data["answer"][idx]}


def make_eval(graphdef, data: dict, batch_size: int):
    """-> `evaluate(state) -> {acc, acc_<question>}` on `data` (one compiled predictor)."""
    predict = jax.jit(lambda s, b: merge(graphdef, s)(b["pixels"], b["question"]).argmax(-1))
    n = len(data["answer"])

    def evaluate(state) -> dict[str, float]:
        pred = np.concatenate([to_host(predict(state, to_batch(data, np.arange(i, min(i + batch_size, n)))))
                               for i in range(0, n, batch_size)])
        right = pred == data["answer"]
        out = {"acc": float(right.mean())}
        out.update({f"acc_{q}": float(right[data["kind"] == k].mean()) for k, q in enumerate(QUESTIONS)})
        return out

    return evaluate


def chance(data: dict) -> dict[str, float]:
    """Accuracy of always answering the most frequent answer of each question type (in `data`)."""
    out = {}
    for k, q in enumerate(QUESTIONS):
        a = data["answer"][data["kind"] == k]
        out[f"acc_{q}"] = float(np.bincount(a).max() / len(a)) if len(a) else float("nan")
    return out


@register("nvila_tiny", Config, presets={
    # smoke leaves out s2-none (256 tokens: the slowest) to stay at a few minutes on a shared 2-core CPU
    "smoke": {"modes": ("low-none", "low-2x2", "s2-2x2", "s2-3x3"), "train_images": 1024, "eval_images": 240,
              "steps": 120, "batch_size": 16, "eval_every": 60},
    "full": {"train_images": 12000, "eval_images": 1200, "steps": 2500, "eval_every": 500},
})
def run(cfg: Config, run: Run) -> None:
    """Tiny VLM on synthetic image questions: accuracy vs compression and S2 at equal LLM tokens."""
    t0 = time.time()
    train = make_dataset(cfg.train_images, cfg.seed)
    test = make_dataset(cfg.eval_images, cfg.seed + 1)
    run.print(f"rendered {cfg.train_images} + {cfg.eval_images} images in {time.time() - t0:.0f} s")
    tx = make_optimizer(OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                                    weight_decay=0.01))
    rows, curves = [], {}
    mesh = run.data_mesh(cfg.batch_size)
    for mode in cfg.modes:
        model = TinyVLM(cfg, mode, rngs=nnx.Rngs(cfg.seed))
        tokens = jax.eval_shape(model.visual_tokens, jax.ShapeDtypeStruct((1, 5, TILE, TILE, 3), jnp.float32)).shape[1]
        graphdef, state = init_train_state(model, tx, mesh=mesh)
        step_fn = make_train_step(graphdef, loss_fn, tx)
        evaluate = make_eval(graphdef, test, 128)
        order = np.random.default_rng(cfg.seed + 2)
        curves[mode] = []
        start = time.time()
        for step in run.progress(range(1, cfg.steps + 1), desc=mode):
            batch = to_batch(train, order.integers(0, cfg.train_images, cfg.batch_size))
            state, metrics = step_fn(state, shard_global_batch(batch, mesh))
            if step % cfg.eval_every == 0 or step == cfg.steps:
                ev = evaluate(state)
                curves[mode].append((step, ev["acc"]))
                run.log(step, mode=mode, visual_tokens=tokens, train_loss=float(metrics["loss"]), **ev)
        seconds = time.time() - start
        rows.append({"mode": mode, "S2": MODES[mode][0] == "s2", "compression": {1: "none", 2: "2x2", 3: "3x3"}[
            MODES[mode][1]], "visual LLM tokens": tokens, **ev, "train s (2-core CPU)": seconds})
    base = chance(test)
    rows.append({"mode": "majority answer", "S2": "", "compression": "", "visual LLM tokens": 0, **base,
                 "acc": float(np.mean(list(base.values()))), "train s (2-core CPU)": 0.0})
    run.save_json("results.json", {"rows": rows, "curves": curves})
    run.results(rows, title=f"Eval accuracy after {cfg.steps} steps ({cfg.train_images} training images, "
                f"{cfg.eval_images} eval images, one seed)", note=_note(rows, cfg))
    _plots(run, rows, curves)


def _note(rows, cfg) -> str:
    by = {r["mode"]: r for r in rows}
    per_type = max(cfg.eval_images // len(QUESTIONS), 1)
    se = (0.25 / per_type) ** 0.5  # binomial standard error at p = 0.5, per question type
    lines = [f"One seed, {cfg.eval_images} eval images (about {per_type} per question type: a binomial standard "
             f"error of up to {100 * se:.0f} points per type, {100 * se / len(QUESTIONS) ** 0.5:.0f} on `acc`); "
             f"smaller differences are noise."]
    pair = [m for m in ("low-none", "s2-2x2") if m in by]
    if pair:
        lines.append("Equal LLM tokens (64): " + ", ".join(
            f"`{m}` acc {by[m]['acc']:.3f} (shape {by[m]['acc_shape']:.3f})" for m in pair) + ".")
    majority = by["majority answer"]["acc"]
    if all(r["acc"] <= majority + se / len(QUESTIONS) ** 0.5 for r in rows if r["mode"] in MODES):
        lines.append("No mode beats always giving each question type's most frequent answer: the model has not "
                     "learned to read the image at this scale, so this run says nothing about compression or S2.")
    return "\n\n".join(lines)


def _plots(run: Run, rows, curves) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [r for r in rows if r["mode"] in MODES]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for q, marker in zip(("acc", *(f"acc_{q}" for q in QUESTIONS)), "o^sD"):
        for s2, colour in ((False, "tab:blue"), (True, "tab:red")):
            pts = sorted((r["visual LLM tokens"], r[q]) for r in models if r["S2"] == s2)
            if pts:
                ax.plot(*zip(*pts), marker=marker, color=colour, alpha=1.0 if q == "acc" else 0.45,
                        label=f"{'S2' if s2 else 'one tile'}: {q}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("visual LLM tokens per image (3x3, 2x2, none)")
    ax.set_ylabel("eval accuracy")
    ax.legend(fontsize=7)
    ax.set_title("accuracy vs visual tokens")
    ax = axes[1]
    for mode, pts in curves.items():
        ax.plot(*zip(*pts), marker="o", label=mode)
    ax.set_xlabel("training step")
    ax.set_ylabel("eval accuracy (all questions)")
    ax.legend(fontsize=7)
    ax.set_title("learning curves")
    run.savefig(fig, "accuracy.png")
