"""Benchmarks: `make bench name=<file name>` runs `python -m benchmarks.<name>`.

The helpers here are shared by the scripts (kept in `__init__` so `make bench` does not list them as a benchmark).
"""

from __future__ import annotations

import sys

from jaxeff.experiment import best_time

__all__ = ["Options", "best_time", "parse_preset"]  # best_time: the one timing helper, shared with experiments


class Options(dict):
    """A preset's options (name -> value) after the command-line overrides; `.preset` is the preset's name."""

    def __init__(self, preset: str, options: dict):
        super().__init__(options)
        self.preset = preset


def parse_preset(argv: list[str], presets: dict[str, dict], default: str = "reduced", *,
                 doc: str | None = None) -> Options:
    """`preset=<name>` (default `default`) plus `key=<int>` overrides of that preset's integer options, as `Options`
    (the name in `.preset`). `-h`, `--help` or `help` prints `doc` (None: the docstring of the script being run,
    `python -m benchmarks.<name>`) and exits with status 0; anything else exits with the list of valid options."""
    usage = f"usage: preset=<{'|'.join(sorted(presets))}> [option=<int> ...]"
    if any(a in ("-h", "--help", "help") for a in argv):
        print((sys.modules["__main__"].__doc__ if doc is None else doc) or usage)
        raise SystemExit(0)
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(f"arguments are key=value, got {bad[0]!r}; {usage}")
    args = dict(a.split("=", 1) for a in argv)
    preset = args.pop("preset", default)
    if preset not in presets:
        raise SystemExit(f"unknown preset {preset!r}; presets: {sorted(presets)}")
    opts = Options(preset, presets[preset])
    settable = sorted(k for k, v in opts.items() if isinstance(v, int))
    for k, v in args.items():
        if k not in settable:
            raise SystemExit(f"unknown option {k!r}; options: {settable + ['preset']}")
        opts[k] = int(v)
    return opts
