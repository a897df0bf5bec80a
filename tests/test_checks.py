"""The shared input checks (`jaxeff.checks`): scalar ints / numbers, dtypes, concreteness, and `Registry`."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.checks import (
    NotANumberError,
    Registry,
    UnknownNameError,
    concrete,
    dtype_of,
    is_concrete,
    require_int,
    require_int_array,
    require_number,
)


def test_require_int_accepts_integers_and_names_the_bad_ones():
    assert require_int(np.int64(3), "n", 1) == 3 and type(require_int(np.int64(3), "n", 1)) is int
    assert require_int(jnp.asarray(2), "n", 0) == 2  # a 0-d array (e.g. mask.sum()) is its number
    assert require_int(-5, "offset") == -5  # no minimum
    with pytest.raises(ValueError, match=r"^batch must be an integer >= 1, got 0$"):
        require_int(0, "batch", 1)
    for bad in (2.5, 2.0, None, True, "3"):  # a type mistake is both a TypeError and a ValueError
        with pytest.raises(TypeError, match=r"sink must be an integer >= 0, got"):
            require_int(bad, "sink", 0)
        with pytest.raises(ValueError):
            require_int(bad, "sink", 0)
    with pytest.raises(NotANumberError, match="steps must be an integer, got str '20'"):
        require_int("20", "steps")


def test_require_number_intervals():
    assert require_number(np.float32(0.5), "p", 0.0, 1.0) == 0.5 and require_number(1, "p", 0.0, 1.0) == 1.0
    with pytest.raises(ValueError, match=r"^lr must be a number in \(0.0, inf\), got 0.0$"):
        require_number(0.0, "lr", 0.0, open_minimum=True)
    with pytest.raises(ValueError, match=r"r must be a number in \[0.0, 1.0\], got 2.0"):
        require_number(2.0, "r", 0.0, 1.0)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="w must be a number"):
            require_number(bad, "w")
    with pytest.raises(NotANumberError, match="w must be a number"):
        require_number(None, "w")
    with pytest.raises(TypeError):
        require_number(False, "w")


def test_dtype_and_concreteness_work_on_tracers():
    assert dtype_of([1, 2]) == np.dtype(int) and dtype_of(jnp.zeros(2, jnp.bfloat16)) == jnp.bfloat16
    require_int_array(np.arange(3), "ids")
    with pytest.raises(TypeError, match=r"^tokens must be integer ids, got dtype float32$"):
        require_int_array(np.zeros(3, np.float32), "tokens")
    assert is_concrete(np.ones(2), jnp.ones(2), 3) and concrete([1, 2]).tolist() == [1, 2]
    seen = []

    def f(x):
        seen.append((is_concrete(np.ones(1), x), concrete(x), dtype_of(x)))
        with pytest.raises(TypeError, match="got dtype float32"):
            require_int_array(x, "ids")  # the dtype is static: checked under jit too
        for check in (require_int, require_number):  # a traced number cannot be read: named, not JAX's error
            with pytest.raises(TypeError, match="^n must be a concrete number, got a traced value"):
                check(x[0], "n")
        return x

    jax.jit(f)(jnp.ones(2))
    assert seen == [(False, None, jnp.float32)]


def test_registry_unknown_names_list_the_known_ones():
    reg = Registry("loss", {"b": 2, "a": 1})
    assert reg["a"] == 1 and "a" in reg and "z" not in reg and reg.get("z") is None and len(reg) == 2
    assert reg == {"a": 1, "b": 2} and list(reg) == ["b", "a"] and repr(reg) == "Registry('loss', ['a', 'b'])"
    for bad in ("sgd", ["a"]):  # a list is unhashable: still the named error
        with pytest.raises(UnknownNameError, match=r"^unknown loss .*; known: \['a', 'b'\]$"):
            reg[bad]
    with pytest.raises(ValueError):
        reg["sgd"]
    with pytest.raises(KeyError):
        reg["sgd"]
    with pytest.raises(TypeError):
        reg["c"] = 3  # read-only
