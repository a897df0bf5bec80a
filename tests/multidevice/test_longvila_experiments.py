"""The LongVILA experiments' smoke paths at tiny size on 8 CPU devices."""

import json

import jax
import pytest

from jaxeff.experiment import run_experiment

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/multidevice conftest)")


def test_mmsp_experiment(tmp_path):
    # The exactness section runs the same library path as test_longvila.py; here: comm, balance, throughput.
    run = run_experiment("longvila_mmsp", "smoke", {
        "ulysses_degrees": "4", "sections": "comm,balance,throughput", "comm_seq": "256", "balance_seq": "256",
        "thr_seq": "256", "thr_heads": "8", "thr_kv_heads": "2", "thr_head_dim": "16", "thr_iters": "1"},
        runs_root=tmp_path)
    text = (run.dir / "results.md").read_text()
    comm_row = next(line.split("|") for line in text.splitlines()
                    if line.startswith("| 2 | 4 | ") and "all-to-all" in line)
    # HLO-measured bytes equal the analytic formula (all-to-all, ring, total).
    assert comm_row[3] == comm_row[4] and comm_row[5] == comm_row[6] and comm_row[7] == comm_row[8]
    assert "withheld (CPU)" in text and "zigzag" in text


def test_niah_experiment(tmp_path):
    run = run_experiment("longvila_niah", "smoke", {
        "steps": "3", "batch": "4", "train_frames_min": "2", "train_frames_max": "4", "eval_frames": "16",
        "depths": "0,1", "eval_videos": "2", "hidden": "32", "layers": "1"}, runs_root=tmp_path)
    acc = json.loads((run.dir / "niah_accuracy.json").read_text())
    assert len(acc["accuracy"]) == 2 and len(acc["accuracy"][0]) == 1
    assert all(0 <= a <= 1 for row in acc["accuracy"] for a in row)
    assert (run.dir / "niah_heatmap.png").stat().st_size > 0
    with pytest.raises(ValueError, match="4x the training length"):
        run_experiment("longvila_niah", "smoke", {"eval_frames": "8"}, runs_root=tmp_path)
