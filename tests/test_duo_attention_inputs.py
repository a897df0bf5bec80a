"""DuoAttention's public API refuses plausible mistakes by name (gate values as a head mask, out-of-range sizes and
ratios, bad pattern files, bad gate-training batches) instead of a deep traceback, NaN or a silent wrong answer.
Every check runs before anything is compiled."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff import duo_attention as da
from jaxeff.data.text import CharTokenizer
from jaxeff.duo_attention import evaluation
from jaxeff.models.llama import Llama, LlamaConfig

ALPHA = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)  # gate values as load_pattern returns them
HEADS = np.array([[True, False], [False, True]])


@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    return Llama(cfg, rngs=nnx.Rngs(0))


def test_head_masks_refuse_gate_values_and_integers(model):
    """alpha cast to bool made every head a retrieval head (nothing compressed); 0/1 integers could be head
    indices, so they need an explicit astype(bool)."""
    kw = dict(sink=2, recent=4)
    with pytest.raises(ValueError, match=r"retrieval_heads holds gate values .*select_retrieval_heads\(alpha, "
                                         r"sparsity\)"):
        da.generate(model, [[1, 2, 3]], 2, retrieval_heads=ALPHA, **kw)
    with pytest.raises(ValueError, match=r"retrieval_heads holds integers: pass mask.astype\(bool\)"):
        da.generate(model, [[1, 2, 3]], 2, retrieval_heads=HEADS.astype(int), **kw)
    with pytest.raises(ValueError, match="retrieval_heads holds gate values"):
        da.DualKVCache.init(ALPHA, 1, 8, 8, **kw)
    with pytest.raises(ValueError, match=r"0.0 / 1.0 values are already a selection"):  # the official 0/1 floats
        da.check_head_mask(HEADS.astype(np.float32))
    with pytest.raises(ValueError, match=r"retrieval_heads has shape \(2, 3\) but the model has 2 layers x 2 KV"):
        da.generate(model, [[1, 2, 3]], 2, retrieval_heads=np.ones((2, 3), bool), **kw)
    with pytest.raises(ValueError, match="must be a bool array"):
        da.check_head_mask(None)
    for ok in (HEADS.tolist(), jnp.asarray(HEADS), da.select_retrieval_heads(ALPHA, 0.5)):
        assert da.check_head_mask(ok, shape=(2, 2)).dtype == bool
    np.testing.assert_array_equal(da.select_retrieval_heads(ALPHA, 0.5), HEADS)


@pytest.mark.parametrize("args, match", [
    ((2.0, 128, 256, 32000), r"retrieval_fraction must be a number in \[0.0, 1.0\], got 2.0"),
    ((float("nan"), 128, 256, 32000), "retrieval_fraction must be a number"),
    ((0.5, -1, 256, 32000), "sink must be an integer >= 0"),
    ((0.5, 128, 0, 32000), "recent must be an integer >= 1"),
    ((0.5, 128, 256, 0), "context must be an integer >= 1"),  # was ZeroDivisionError
])
def test_kv_cache_ratio_checks_its_ranges(args, match):
    with pytest.raises(ValueError, match=match):
        da.kv_cache_ratio(*args)


def test_kv_cache_ratio_values():
    assert da.kv_cache_ratio(1.0, 128, 256, 1000) == 1.0
    assert da.kv_cache_ratio(0.0, 128, 256, 384) == 1.0  # window covers the context
    assert da.kv_cache_ratio(jnp.float32(0.5), 128, 256, 3840) == pytest.approx(0.55)  # a JAX scalar mean


@pytest.mark.parametrize("cls, kw, match", [
    (da.GateTrainConfig, dict(mask_block=0), r"GateTrainConfig.mask_block must be an integer >= 1, got 0"),
    (da.GateTrainConfig, dict(sink=-1), r"GateTrainConfig.sink must be an integer >= 0"),
    (da.GateTrainConfig, dict(recent=0), r"GateTrainConfig.recent must be an integer >= 1"),
    (da.GateTrainConfig, dict(steps=2.5), r"GateTrainConfig.steps must be an integer >= 1, got 2.5"),
    (da.GateTrainConfig, dict(lr=float("nan")), r"GateTrainConfig.lr must be a number in \(0.0, inf\)"),
    (da.GateTrainConfig, dict(warmup_steps=0), r"GateTrainConfig.warmup_steps .*integer >= 1"),
    (da.GateTrainConfig, dict(lr_floor=1.5), r"GateTrainConfig.lr_floor must be a number in \[0.0, 1.0\]"),
    (da.GateTrainConfig, dict(reg_weight=-0.05), r"GateTrainConfig.reg_weight must be a number in \[0.0, inf\)"),
    (da.GateTrainConfig, dict(initial_value=2.0), r"GateTrainConfig.initial_value .*\[0.0, 1.0\]"),
    (da.GateTrainConfig, dict(implementation="cuda"), r"GateTrainConfig.implementation must be one of"),
    (da.CalibrationConfig, dict(context_min=0), r"CalibrationConfig.context_min must be an integer >= 1"),
    (da.CalibrationConfig, dict(context_max=500), r"CalibrationConfig.context_max \(>= context_min\) .*>= 1000"),
    (da.CalibrationConfig, dict(pad_to_multiple_of=0), r"CalibrationConfig.pad_to_multiple_of must be"),
    (da.CalibrationConfig, dict(buffer_size=-1), r"CalibrationConfig.buffer_size must be an integer >= 0"),
    (da.CalibrationConfig, dict(num_passkeys=21), r"CalibrationConfig.num_passkeys must be in \[1, 20\]"),
    (da.CalibrationConfig, dict(depth_max=0.01), r"CalibrationConfig.depth_max \(>= depth_min\)"),
])
def test_config_errors_name_the_field_and_range(cls, kw, match):
    with pytest.raises(ValueError, match=match) as err:
        cls(**kw)
    assert f"{cls.__name__}(" not in str(err.value)  # the field, not the whole repr


def test_pattern_files_and_selection_refuse_bad_values(tmp_path):
    with pytest.raises(ValueError, match="non-finite"):
        da.save_pattern(tmp_path / "nan", np.array([[np.nan, 1.0]]), 4, 8)
    with pytest.raises(ValueError, match="sink_size must be an integer >= 0"):
        da.save_pattern(tmp_path / "neg", ALPHA, -1, 8)
    with pytest.raises(ValueError, match=r"config.json cannot hold .*float32"):
        da.save_pattern(tmp_path / "js", ALPHA, 4, 8, lr=np.float32(0.02))
    assert not any(tmp_path.iterdir())  # nothing half-written

    def pattern(name, tsv, cfg):
        (tmp_path / name).mkdir()
        (tmp_path / name / "full_attention_heads.tsv").write_text(tsv)
        (tmp_path / name / "config.json").write_text(cfg)
        return tmp_path / name

    good_cfg = json.dumps({"sink_size": 4, "recent_size": 8})
    with pytest.raises(ValueError, match="holds no gate values"):
        da.load_pattern(pattern("empty", "", good_cfg))
    with pytest.raises(ValueError, match="not a tab-separated"):
        da.load_pattern(pattern("ragged", "1\t0\n1\n", good_cfg))
    with pytest.raises(ValueError, match="must hold a JSON object"):
        da.load_pattern(pattern("list", "1\t0\n", "[4, 8]"))
    with pytest.raises(ValueError, match="recent_size in .*config.json must be an integer >= 1, got 0"):
        da.load_pattern(pattern("zero", "1\t0\n", json.dumps({"sink_size": 4, "recent_size": 0})))

    with pytest.raises(ValueError, match="non-finite"):  # NaN made every head a streaming head
        da.select_retrieval_heads(np.array([[np.nan, 0.5], [0.2, 0.9]]), 0.5)
    with pytest.raises(ValueError, match=r"sparsity \(the fraction of streaming heads\) .*got 50"):
        da.select_retrieval_heads(ALPHA, 50)
    with pytest.raises(ValueError, match="retrieval holds gate values"):
        da.selection_ties(ALPHA, ALPHA)


@pytest.mark.parametrize("kw, match", [
    (dict(sink=2.0), "sink must be an integer >= 0, got 2.0"),  # was a shape error deep in JAX
    (dict(sink=None), "sink must be an integer >= 0, got None"),
    (dict(recent=0), "recent must be an integer >= 1"),
    (dict(chunk_size=2.5), r"chunk_size \(0 = the whole prompt\) must be an integer >= 0"),
    (dict(max_len=0.5), "max_len must be an integer >= 1"),
])
def test_generate_sizes_are_checked_by_name(model, kw, match):
    with pytest.raises(ValueError, match=match):
        da.generate(model, [[1, 2, 3]], 2, **{"retrieval_heads": HEADS, "sink": 2, "recent": 4, **kw})


def test_gate_training_refuses_bad_batches(model):
    cfg = da.GateTrainConfig(sink=2, recent=4, steps=1, mask_block=2)
    tokens, mask = np.arange(16)[None] % 64, np.ones((1, 16), np.float32)
    for batch, match in [
        ({"tokens": tokens + 60, "mask": mask}, r"holds id 64 outside the model's vocabulary \[0, 64\)"),  # was NaN
        ({"tokens": tokens, "mask": 0 * mask}, "marks no answer token"),  # gates silently decayed to 0
        ({"tokens": tokens[0], "mask": mask[0]}, r"integer ids \[batch, seq\] \(one row: tokens\[None\]\)"),
        ({"tokens": tokens, "mask": mask[:, 1:]}, r"batch\['mask'\] has shape \(1, 15\)"),
        ({"tokens": tokens}, "a dict with 'tokens' and 'mask'"),
    ]:
        with pytest.raises(ValueError, match=match):
            da.train_gates(model, iter([batch]), cfg)
    with pytest.raises(ValueError, match="batches ended after 0 steps but GateTrainConfig.steps is 1"):
        da.train_gates(model, iter([]), cfg)  # was a bare StopIteration
    data = da.MultiPasskeyData(CharTokenizer(), text="a haystack sentence. " * 20, config=da.CalibrationConfig(
        num_passkeys=1, passkey_length=2, context_min=300, context_max=700, context_intervals=2))
    with pytest.raises(TypeError, match=r"pass data.batches\(seed=0\)"):
        da.train_gates(model, data, cfg)
    with pytest.raises(TypeError, match="tokenizer must be"):
        da.MultiPasskeyData(None)
    with pytest.raises(TypeError, match="config must be a CalibrationConfig"):
        da.MultiPasskeyData(CharTokenizer(), config={"num_passkeys": 1})


def test_evaluation_refuses_mismatched_keys_and_sizes():
    with pytest.raises(ValueError, match="3 generated rows but 1 keys"):  # zip() scored one row silently
        evaluation.key_matches(np.zeros((3, 5), np.int32), ["12345"])
    with pytest.raises(ValueError, match=r"n \(prompts\) must be an integer >= 1"):
        evaluation.passkey_prompts(200, 0)
    with pytest.raises(ValueError, match="key_digits must be an integer >= 1"):
        evaluation.passkey_prompts(200, 1, key_digits=0)

    class Chars:  # a stand-in for a Hugging Face tokenizer: one token per character
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    with pytest.raises(ValueError, match="leaves no room for a haystack"):
        evaluation.passkey_prompts(20, 1, tokenizer=Chars())
