"""Experiment registry and runner.

An experiment is one file in `experiments/` that registers a name, a frozen config dataclass, presets and a run
function::

    @dataclasses.dataclass(frozen=True)
    class Config:
        steps: int = 100

    @register("my_exp", Config, presets={"smoke": {"steps": 20}, "full": {"steps": 2000}})
    def run(cfg: Config, run: Run) -> None:
        for step in run.progress(range(cfg.steps)):
            run.log(step, loss=...)
        run.results([{"metric": "loss", "value": 0.1}])

`python -m jaxeff.run name=my_exp [preset=smoke|full] [key=value ...]` (what `make exp` calls) validates every
override against the dataclass *before* creating `runs/<name>/<UTC time>/`, so bad input never leaves a
half-written directory. A run that raises renames its directory to `<time>.failed` unless it holds checkpoints
that `resume=true` can continue.

Multi-process (`jax.distributed`, see docs/multihost.md): every process runs the same experiment; process 0 picks
(or, with `resume=true`, finds) the run directory and broadcasts its name, and only process 0 creates it and writes
`config.json`, `metrics.jsonl`, `results.md`, arrays, plots and progress bars (`Run.is_main`). `Run.mesh` is a
data-parallel mesh over every process's devices (`Run.data_mesh(batch)`: over those a batch divides among). From
the command line, an exception on any process stops all processes with a message naming the failing one.
`runs_root` must be a filesystem every host sees (checkpoints).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import importlib
import json
import pkgutil
import shutil
import sys
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

PRESETS = ("smoke", "full")
USAGE = ("usage: python -m jaxeff.run name=<experiment> [preset=smoke|full] [resume=true] [runs_root=DIR] "
         "[key=value ...]")


class ExperimentError(ValueError):
    """Bad experiment name, preset or override; the runner exits with status 2."""


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    config_cls: type
    presets: Mapping[str, Mapping[str, Any]]
    fn: Callable[[Any, Run], Any]
    description: str = ""


_REGISTRY: dict[str, Experiment] = {}
_IMPORT_ERRORS: dict[str, str] = {}


def register(name: str, config_cls: type, *, presets: Mapping[str, Mapping[str, Any]], description: str = ""):
    """Decorator registering `fn(cfg, run)` as experiment `name`."""
    if not dataclasses.is_dataclass(config_cls) or not config_cls.__dataclass_params__.frozen:
        raise TypeError(f"experiment {name!r}: config must be a frozen dataclass")
    missing = [p for p in PRESETS if p not in presets]
    if missing:
        raise TypeError(f"experiment {name!r}: presets {missing} missing")
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for preset, values in presets.items():
        unknown = set(values) - fields
        if unknown:
            raise TypeError(f"experiment {name!r}: preset {preset!r} sets unknown keys {sorted(unknown)}")

    def wrap(fn):
        if name in _REGISTRY and _REGISTRY[name].fn.__module__ != fn.__module__:
            raise TypeError(f"experiment {name!r} registered twice")
        doc = description or (fn.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = Experiment(name, config_cls, dict(presets), fn, doc)
        return fn

    return wrap


def load_all() -> dict[str, Experiment]:
    """Import every module in the `experiments` package so each registers itself."""
    import experiments

    for info in pkgutil.iter_modules(experiments.__path__):
        if info.name.startswith("_") or info.name in _IMPORT_ERRORS:
            continue
        try:
            importlib.import_module(f"experiments.{info.name}")
        except Exception as e:  # one broken experiment file must not hide the others
            _IMPORT_ERRORS[info.name] = f"{type(e).__name__}: {e}"
    return dict(_REGISTRY)


def get(name: str) -> Experiment:
    registry = load_all()
    if name not in registry:
        known = "\n  ".join(f"{n:<24} {registry[n].description}".rstrip() for n in sorted(registry))
        broken = "".join(f"\n  experiments/{m}.py: {err}" for m, err in sorted(_IMPORT_ERRORS.items()))
        if broken:
            broken = "\nthese experiment files failed to import:" + broken
        close = difflib.get_close_matches(name, list(registry), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ExperimentError(f"unknown experiment {name!r}{hint}; known experiments:\n  {known}{broken}")
    return registry[name]


def default_preset() -> str:
    import jax

    return "smoke" if jax.default_backend() == "cpu" else "full"


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _convert(text: str, annotation: Any) -> Any:
    """Convert a command-line string to the field's annotated type (raises ValueError)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.lower() in ("none", "null", ""):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(text, arg)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        for arg in args:
            try:
                value = _convert(text, type(arg))
            except ValueError:
                continue
            if value == arg:
                return value
        raise ValueError(f"{text!r} is not one of {list(args)}")
    if origin in (tuple, list, Sequence):
        items = [t for t in text.strip("()[]").split(",") if t.strip()]
        item_type = args[0] if args else str
        return tuple(_convert(t.strip(), item_type) for t in items)
    if annotation is bool:
        return _parse_bool(text)
    if annotation is int:
        return int(text)
    if annotation is float:
        return float(text)
    if annotation in (str, Any):
        return text
    if annotation is Path:
        return Path(text)
    raise ValueError(f"cannot parse a value of type {annotation}")


def make_config(exp: Experiment, preset: str, overrides: Mapping[str, str]):
    """Preset values, then `key=value` overrides converted to the field types; errors name the key."""
    if preset not in exp.presets:
        raise ExperimentError(f"experiment {exp.name!r} has no preset {preset!r}; presets: {sorted(exp.presets)}")
    hints = typing.get_type_hints(exp.config_cls)
    fields = {f.name for f in dataclasses.fields(exp.config_cls)}
    values = dict(exp.presets[preset])
    for key, text in overrides.items():
        if key not in fields:
            raise ExperimentError(f"unknown key {key!r} for experiment {exp.name!r}; keys: {sorted(fields)}")
        try:
            values[key] = _convert(text, hints[key])
        except ValueError as e:
            raise ExperimentError(f"bad value for {key}={text!r} (expected {hints[key]}): {e}") from None
    cfg = exp.config_cls(**values)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        try:
            validate()
        except (ValueError, FileNotFoundError) as e:
            raise ExperimentError(f"invalid config for {exp.name!r}: {e}") from None
    return cfg


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj


def markdown_table(rows: Sequence[Mapping[str, Any]], float_fmt: str = "{:.4g}") -> str:
    if not rows:
        return "(no rows)\n"
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]

    def fmt(v):
        if isinstance(v, float):
            return float_fmt.format(v)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def call_times(fn: Callable[..., Any], *args: Any, repeats: int) -> list[float]:
    """Wall seconds of each of `repeats` calls `fn(*args)`, each waiting for its result (`jax.block_until_ready`),
    after one compile + warm-up call."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return times


def best_time(fn: Callable[..., Any], *args: Any, repeats: int) -> float:
    """Best wall seconds of `fn(*args)` over `repeats` calls, after one compile + warm-up call (`call_times`)."""
    return min(call_times(fn, *args, repeats=repeats))


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% for z = 1.96) of the binomial proportion k / n, widened where float rounding
    would leave p just outside it (k = n gives an upper bound of exactly 1.0 or more); (nan, nan) for n = 0 (no
    trials: no interval)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return min(centre - half, p), max(centre + half, p)


def image_grid(images: Iterable[Any], rows: int, cols: int, *, cell: float = 1.1, **imshow: Any):
    """A matplotlib figure of `images` (each [H, W] or [H, W, 3], shown as given: clip or scale them first) on a
    `rows` x `cols` grid of `cell`-inch squares, axes off; `imshow` keywords (cmap, vmin, vmax) go to every image.
    Save it with `Run.savefig`."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell, rows * cell))
    for ax, im in zip(np.asarray(axes).ravel(), images):
        ax.imshow(np.asarray(im), **imshow)
        ax.axis("off")
    return fig


class Run:
    """Handle given to an experiment: where its files go and how it reports."""

    def __init__(self, name: str, preset: str, config: Any, directory: Path, resumed: bool = False,
                 description: str = ""):
        self.name = name
        self.description = description
        self.preset = preset
        self.config = config
        self.dir = directory
        self.resumed = resumed
        self._results: list[str] = []
        self._figures: list[str] = []
        self._wall: float | None = None
        self._start = time.time()
        self._mesh = None

    @property
    def is_main(self) -> bool:
        """Whether this is the process that writes the run directory (process 0; always true on one process)."""
        from jaxeff import distributed

        return distributed.is_main()

    @property
    def mesh(self):
        """Data-parallel mesh (axis `data`) over all processes' devices (`jaxeff.distributed.make_mesh`)."""
        if self._mesh is None:
            from jaxeff import distributed

            self._mesh = distributed.make_mesh()
        return self._mesh

    def data_mesh(self, global_batch: int):
        """`Run.mesh` when `global_batch` divides among all its devices, else a data-parallel mesh over the most
        devices (the same number per process) that it does, with a note on process 0
        (`jaxeff.distributed.data_mesh`)."""
        from jaxeff import distributed

        if global_batch % self.mesh.size == 0:
            return self.mesh
        mesh = distributed.data_mesh(global_batch)
        self.print(f"note: batch {global_batch} does not divide among {self.mesh.size} devices; data parallel over "
                   f"{mesh.size} of them")
        return mesh

    def print(self, *args, **kw) -> None:
        """`print` on process 0 only."""
        if self.is_main:
            print(*args, **kw)

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"

    def log(self, step: int, **metrics: Any) -> None:
        if not self.is_main:
            return
        record = {"step": int(step), "time": round(time.time() - self._start, 3)}
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def results(self, rows: Sequence[Mapping[str, Any]], title: str | None = None, note: str | None = None) -> None:
        """Append a table (and an optional note) to results.md; also prints it."""
        block = f"## {title}\n\n" if title else ""
        block += markdown_table(rows)
        if note:
            block += f"\n{note}\n"
        self._results.append(block)
        if self.is_main:
            self._write_results()
            print(block)

    def _write_results(self) -> None:
        """results.md: what ran (description, preset, where, on what), the tables, then the saved figures."""
        import jax

        started = _dt.datetime.fromtimestamp(self._start, _dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        devices = jax.devices()
        lines = [f"# {self.name} ({self.preset})", ""]
        if self.description:
            lines += [self.description, ""]
        wall = "running" if self._wall is None else f"{self._wall:.0f} s wall"
        lines += [f"Run directory: `{self.dir}`; started {started}, {wall}; jax {jax.__version__} on "
                  f"{len(devices)} x {devices[0].device_kind} ({jax.process_count()} process(es)).", ""]
        body = "\n".join(self._results)
        if self._figures:
            body += "\n## Figures\n\n" + "\n\n".join(f"![{f}]({f})" for f in self._figures) + "\n"
        (self.dir / "results.md").write_text("\n".join(lines) + "\n" + body)

    def finish(self) -> None:
        """Record the wall time in results.md (the runner calls this when the experiment returns)."""
        self._wall = time.time() - self._start
        if self.is_main and (self._results or self._figures):
            self._write_results()

    def savefig(self, fig, filename: str) -> Path:
        path = self.dir / filename
        if self.is_main:
            fig.savefig(path, dpi=110, bbox_inches="tight")
            if filename.endswith((".png", ".jpg", ".svg")) and filename not in self._figures:
                self._figures.append(filename)
                if self._results:
                    self._write_results()
        import matplotlib.pyplot as plt

        plt.close(fig)
        return path

    def save_json(self, filename: str, obj: Any) -> Path:
        path = self.dir / filename
        if self.is_main:
            path.write_text(json.dumps(_jsonable(obj), indent=2))
        return path

    def savez(self, filename: str, **arrays: Any) -> Path:
        """`numpy.savez_compressed` of `arrays` (numpy or fully replicated / local `jax.Array`s) into the run
        directory, on process 0 only."""
        path = self.dir / filename
        if self.is_main:
            import numpy as np

            np.savez_compressed(path, **{k: np.asarray(v) for k, v in arrays.items()})
        return path

    def progress(self, iterable: Iterable | None = None, total: int | None = None, desc: str | None = None, **kw):
        from tqdm.auto import tqdm

        kw.setdefault("disable", not self.is_main)
        return tqdm(iterable, total=total, desc=desc or self.name, dynamic_ncols=True, **kw)


def _utc_stamp() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")


COMPLETE_MARKER = ".complete"


def _latest_resumable(root: Path) -> Path | None:
    """Newest run directory that holds checkpoints and did not finish."""
    candidates = sorted(
        p for p in root.glob("*")
        if p.is_dir() and (p / "checkpoints").is_dir() and not (p / COMPLETE_MARKER).exists()
    )
    return candidates[-1] if candidates else None


def config_differences(saved: Mapping, cfg: Any, *, ignore: Iterable[str] = ()) -> list[str]:
    """"field: saved -> now" for each field of `saved` (a config as config.json stores it, e.g. a run's
    `json.load(...)["config"]`) that differs from `cfg` (a config dataclass or mapping, compared in the same JSON
    form: tuples as lists), sorted by field; a field only one side has counts as a difference (shown as <absent>).
    Fields named in `ignore` are skipped. Empty: the same config."""
    now, skip = _jsonable(cfg), set(ignore)

    def show(config: Mapping, key: str) -> str:
        return repr(config[key]) if key in config else "<absent>"

    return [f"{k}: {show(saved, k)} -> {show(now, k)}" for k in sorted(set(saved) | set(now))
            if k not in skip and (k not in saved or k not in now or saved[k] != now[k])]


def run_experiment(
    name: str,
    preset: str | None = None,
    overrides: Mapping[str, str] | None = None,
    *,
    runs_root: str | Path = "runs",
    resume: bool = False,
) -> Run:
    """Validate, create the run directory, run, and return the finished `Run`."""
    from jaxeff import distributed

    distributed.maybe_initialize()
    exp = get(name)
    preset = preset or default_preset()
    cfg = make_config(exp, preset, overrides or {})
    root = Path(runs_root) / name
    main_process = distributed.is_main()
    chosen = ""
    if main_process:  # process 0 decides; the others learn the directory by broadcast
        directory = _latest_resumable(root) if resume else None
        if resume and directory is None:
            print(f"resume=true: no unfinished run with checkpoints under {root}; starting a new run",
                  file=sys.stderr)
        if directory is not None:
            try:
                changed = config_differences(json.loads((directory / "config.json").read_text())["config"], cfg)
            except (OSError, ValueError, KeyError):
                changed = ["(config.json unreadable)"]
            if changed:
                print(f"warning: resuming {directory} with a changed config: {'; '.join(changed)}", file=sys.stderr)
            chosen = "resume:" + str(directory)
        else:
            directory = root / _utc_stamp()
            suffix = 1
            while directory.exists():
                directory = root / f"{_utc_stamp()}-{suffix}"
                suffix += 1
            directory.mkdir(parents=True)
            chosen = "new:" + str(directory)
    kind, path = distributed.broadcast_str(chosen).split(":", 1)
    directory, resumed = Path(path), kind == "resume"
    run = Run(name, preset, cfg, directory, resumed=resumed, description=exp.description)
    run.save_json("config.json", {"experiment": name, "preset": preset, "config": cfg})
    done = False

    def mark_failed():
        if main_process and not done and not run.checkpoint_dir.exists() and directory.exists():
            shutil.move(str(directory), str(directory.with_name(directory.name + ".failed")))

    if distributed.is_initialized():  # also when another process's failure stops this one
        distributed.at_failure(mark_failed)
    try:
        exp.fn(cfg, run)
        run.finish()
    except BaseException:
        mark_failed()
        done = True
        raise
    if main_process:
        (directory / COMPLETE_MARKER).touch()
    done = True
    return run


def parse_argv(argv: Sequence[str]) -> tuple[str, str | None, bool, dict[str, str], str]:
    name, preset, resume, runs_root = None, None, False, "runs"
    overrides: dict[str, str] = {}
    for arg in argv:
        if arg in ("-h", "--help", "help"):
            raise ExperimentError(USAGE + "\nexperiments:\n  " + "\n  ".join(sorted(load_all())))
        if "=" not in arg:
            raise ExperimentError(f"arguments are key=value, got {arg!r}\n{USAGE}")
        key, value = arg.split("=", 1)
        if key == "name":
            name = value
        elif key == "preset":
            preset = value or None
        elif key == "resume":
            try:
                resume = _parse_bool(value)
            except ValueError as e:
                raise ExperimentError(f"bad value for resume: {e}") from None
        elif key == "runs_root":
            runs_root = value
        else:
            overrides[key] = value
    if not name:
        raise ExperimentError("missing name=<experiment>; known experiments:\n  " + "\n  ".join(sorted(load_all())))
    if preset is not None and preset not in PRESETS:
        raise ExperimentError(f"unknown preset {preset!r}; presets: {list(PRESETS)}")
    return name, preset, resume, overrides, runs_root


def main(argv: Sequence[str] | None = None) -> int:
    """The command line. Multi-process, an exception on any process stops every process (`distributed.fail_all`)
    rather than leaving the others waiting in a collective."""
    from jaxeff import distributed

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        name, preset, resume, overrides, runs_root = parse_argv(argv)
        run = run_experiment(name, preset, overrides, runs_root=runs_root, resume=resume)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BaseException as e:
        if distributed.is_initialized():
            distributed.fail_all(e, 130 if isinstance(e, KeyboardInterrupt) else 1)
        raise
    run.print(f"results: {run.dir}")
    return 0
