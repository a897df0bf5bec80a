"""A ported trainer on a data-parallel mesh of several devices in one process gives the one-device result: the
same global batch, split over the devices (`Run.data_mesh`, `jaxeff.distributed.shard_global_batch`)."""

import json

import jax
import numpy as np
import pytest

from jaxeff import distributed
from jaxeff.experiment import run_experiment

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (tests/multidevice conftest)")

TINY = {"vit_hidden": "16", "vit_layers": "2", "llm_hidden": "32", "llm_layers": "1", "modes": "low-2x2",
        "train_images": "16", "eval_images": "6", "steps": "3", "batch_size": "4", "eval_every": "3"}


def _metrics(run):
    return [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]


def test_nvila_tiny_on_4_devices_equals_1_device(tmp_path, monkeypatch, capsys):
    many = run_experiment("nvila_tiny", "smoke", TINY, runs_root=tmp_path / "many")  # batch 4: 4 of the 8 devices
    assert "data parallel over 4 of them" in capsys.readouterr().out
    one_device = distributed.make_mesh(devices=jax.devices()[:1])
    monkeypatch.setattr(distributed, "make_mesh", lambda *a, **k: one_device)
    one = run_experiment("nvila_tiny", "smoke", TINY, runs_root=tmp_path / "one")
    a, b = _metrics(one), _metrics(many)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [3]
    np.testing.assert_allclose(b[0]["train_loss"], a[0]["train_loss"], rtol=1e-5)
    assert b[0]["acc"] == a[0]["acc"]
