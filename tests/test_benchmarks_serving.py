"""The serving benchmarks (benchmarks/serving.py, duo_attention.py, lserve.py): their settings, helpers and counts.
No timings are asserted (a benchmark is a script): the presets' settings are valid, the memory table agrees with the
paper's formula, and one tiny LServe run reads fewer pages and bytes than the same engine dense."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flax import nnx

from benchmarks import duo_attention, lserve, serving
from jaxeff.lserve import LServeConfig
from jaxeff.models.llama import Llama


@pytest.mark.parametrize("module", [serving, duo_attention, lserve])
def test_help_prints_the_docstring(module, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == module.__doc__.strip()


def test_arguments_are_checked():
    with pytest.raises(SystemExit, match="unknown option 'pattern'"):  # no pattern= in the DuoAttention bench
        duo_attention.main(["pattern=/tmp"])
    with pytest.raises(SystemExit, match="unknown preset 'huge'"):
        lserve.main(["preset=huge"])
    assert serving.parse_args(["pattern=p", "budget=64"], lserve.PRESETS, "")[1:] == (
        {**lserve.PRESETS["smoke"], "budget": 64}, "p")
    assert serving.parse_args(["preset=full"], lserve.PRESETS, "")[0] == "full"


@pytest.mark.parametrize("preset", ["smoke", "full"])
def test_lserve_presets_are_valid_engine_settings(preset):
    """The full preset cannot run here: at least its contexts and budgets make valid LServeConfigs."""
    opts = lserve.PRESETS[preset]
    for ctx in opts["contexts"]:
        for b in opts["budgets"] + (opts["budget"],):
            cfg = serving.lserve_config(opts, ctx, opts["new_tokens"], token_budget=b)
            assert cfg.max_len == ctx + opts["new_tokens"] and cfg.sparse_prefill and cfg.prefill_chunk == ctx


def test_ratios_divide_the_reference_by_the_engine():
    r, ref = {"prefill s": 2.0, "decode ms/token": 1.0, "KV GiB": 4.0}, {"prefill s": 3.0, "decode ms/token": 2.0}
    assert serving.ratios(r, ref, " vs d") == {"prefill x vs d": 1.5, "decode x vs d": 2.0}


def test_memory_table_matches_the_papers_formula():
    """Paper-shape caches (eval_shape: nothing allocated): the measured KV ratio is the formula's, the retrieval
    share is the setting's, and weights + KV saves less than KV alone but more at longer contexts."""
    for setting, share, limit in (("MHA", 0.25, 4.0), ("GQA", 0.5, 2.0)):
        rows = duo_attention.memory_table(setting)
        assert [r["context"] for r in rows] == list(duo_attention.SETTINGS[setting]["memory_contexts"])
        for row in rows:
            kept, total = map(int, row["retrieval"].split("/"))
            assert kept / total == share
            assert row["KV x"] == pytest.approx(row["KV x formula"], rel=1e-12)
            assert 1 < row["weights+KV x"] < row["KV x"] < limit
        assert np.all(np.diff([r["weights+KV x"] for r in rows]) > 0)


def test_lserve_reads_fewer_pages_than_dense():
    opts = dict(lserve.PRESETS["smoke"], num_hidden_layers=1, hidden_size=64, intermediate_size=128)
    model = Llama(serving.model_config(opts), rngs=nnx.Rngs(0))
    retrieval, _ = serving.retrieval_pattern(model.config, "")
    ctx, n = 256, 3
    prompt = np.random.default_rng(0).integers(0, opts["vocab_size"], ctx).tolist()
    cfg = serving.lserve_config(opts, ctx, n, token_budget=64)
    assert isinstance(cfg, LServeConfig)
    sparse = serving.time_lserve(model, cfg, ~retrieval, prompt, n, 1)
    dense = serving.time_lserve(model, dataclasses.replace(cfg, dynamic_sparsity=False), None, prompt, n, 1)
    # dense: every page of every KV head; one KV head per layer here, 17 pages of 16 tokens at the first step.
    assert dense["pages read/step"] == pytest.approx((17 + 17) / 2 * model.config.num_key_value_heads)
    assert sparse["pages read/step"] < dense["pages read/step"]
    assert sparse["KV MiB read/step"] < dense["KV MiB read/step"] and sparse["KV GiB"] < dense["KV GiB"]
