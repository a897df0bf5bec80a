"""`make bench name=longvila`'s argument checks and the causal-work count it prints (single process, no devices
needed: nothing is compiled)."""

import numpy as np
import pytest

from benchmarks import longvila as bench
from jaxeff.longvila.layout import causal_work, layout_permutation
from jaxeff.longvila.measure import factorisations


def test_options_and_bad_input(capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse(["--help"])
    assert e.value.code == 0 and "make bench name=longvila" in capsys.readouterr().out
    opts = bench.parse(["lengths=32,64", "heads=4", "kv_heads=1"])
    assert opts["lengths"] == (32, 64) and opts["heads"] == 4 and opts["dtype"] == "float32"
    assert bench.parse(["preset=full"])["dtype"] == "bfloat16"
    # 8 devices: the pure ring zigzag needs a multiple of 2 x 8.
    with pytest.raises(SystemExit, match=r"lengths \[24\]: every length must be a positive multiple of 16"):
        bench.parse(["lengths=32,24"])
    with pytest.raises(SystemExit, match="comma-separated integers"):
        bench.parse(["lengths=1k"])
    with pytest.raises(SystemExit, match=r"heads \(6\) must be a multiple of kv_heads \(4\)"):
        bench.parse(["heads=6", "kv_heads=4"])
    with pytest.raises(SystemExit, match="devices >= 2"):
        bench.parse(["devices=1"])
    with pytest.raises(SystemExit, match="unknown option 'dtype'"):
        bench.parse(["dtype=3"])


@pytest.mark.parametrize("zigzag", [True, False])
def test_causal_work_counts_every_visible_pair_once(zigzag):
    # Any token order: the devices' visible (q, k) pairs add up to the causal triangle S(S+1)/2, and the kernel
    # computes at least those (it skips only fully masked sub-blocks), more with coarser blocks (larger U).
    s = 96
    worst = []
    for ring, uly in factorisations(8):
        if s % (2 * ring * uly):
            continue
        work = causal_work(layout_permutation(s, ring, uly, zigzag), ring, uly)
        assert work["pairs"].sum() == s * (s + 1) // 2
        assert np.all(work["executed"] >= work["pairs"])
        worst.append(work["critical_path"][0])
    if zigzag:
        assert worst == sorted(worst) and worst[0] < worst[-1]
