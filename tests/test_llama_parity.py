"""Logit and greedy-decode parity with transformers' PyTorch Llama / Mistral / Qwen2 (tiny random configs)."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxeff.io import from_pretrained, save_pretrained  # noqa: E402
from jaxeff.io.state_dict import CheckpointMismatchError  # noqa: E402
from jaxeff.models.llama import generate  # noqa: E402

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
CASES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rope_theta=500000.0)),
    "llama31": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}, rope_theta=10000.0)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=24, head_dim=16)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
}


def _hf_model(kind, tmp_path, seed=0):
    cfg_cls, model_cls, extra = CASES[kind]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**COMMON, **extra)).eval()
    # random (not default-initialised) norm weights and biases so every parameter is exercised
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


@pytest.mark.parametrize("kind", list(CASES))
def test_logits_and_greedy_match_transformers(kind, tmp_path):
    hf = _hf_model(kind, tmp_path)
    ours = from_pretrained(tmp_path)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, COMMON["vocab_size"], size=(2, 40))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(tokens)))
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 1e-4, rel

    prompt = tokens[0, :7]
    with torch.no_grad():
        ref_ids = hf.generate(torch.tensor(prompt[None]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                              pad_token_id=0)[0, 7:].numpy()
    out = generate(ours, [prompt.tolist()], 32, eos_id=None)  # min_new_tokens: transformers does not stop either
    np.testing.assert_array_equal(out.tokens[0], ref_ids)


def test_ragged_batch_generation_equals_one_by_one(tmp_path):
    _hf_model("qwen2", tmp_path)
    model = from_pretrained(tmp_path)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [9]]
    batch = generate(model, prompts, 12).tokens
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(batch[i], generate(model, [p], 12).tokens[0])


def test_bfloat16_and_sharded_save_roundtrip(tmp_path):
    hf = _hf_model("llama", tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf", dtype=jnp.bfloat16)
    assert model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    tokens = np.arange(30)[None] % COMMON["vocab_size"]
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(model(jnp.asarray(tokens)).astype(jnp.float32))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 3e-2

    f32 = from_pretrained(tmp_path / "hf")
    save_pretrained(f32, tmp_path / "sharded", max_shard_bytes=50_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(torch.tensor(tokens)).logits.numpy(), ref, atol=1e-5)


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    from jaxeff.io.safetensors import load_file, save_file

    _hf_model("llama", tmp_path)
    tensors = dict(load_file(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    tensors["model.norm.weight"] = np.zeros(5, np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as err:
        from_pretrained(tmp_path)
    msg = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "model.layers.0.extra.weight" in msg
    assert "model.norm.weight" in msg


# One random config per computation-changing field (issue 21): logits against transformers, then save_pretrained ->
# transformers and -> jaxeff keep the fields and the logits.
FIELD_CASES = {
    # Qwen2 windows layers >= max_window_layers only: none here, the second layer in the next case.
    "qwen2_window_from_max_window_layers_2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        use_sliding_window=True, sliding_window=8, max_window_layers=2)),
    "qwen2_window_from_max_window_layers_1": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen2_layer_types": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        use_sliding_window=True, sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    "qwen2_window_off": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        use_sliding_window=False, sliding_window=8, max_window_layers=0)),
    "mistral_window": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=8)),
    "llama_biases_head_dim": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        attention_bias=True, mlp_bias=True, head_dim=24, tie_word_embeddings=True)),
    "llama_linear_rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_scaling={"rope_type": "linear", "factor": 3.0})),
    "llama_yarn": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2_yarn_mscale": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "mscale": 0.9,
                      "mscale_all_dim": 0.5, "beta_fast": 16, "truncate": False}, rms_norm_eps=1e-2)),
}
# config.json keys that change the computation, compared after the round trip (rope is checked by the logits)
COMPUTE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "attention_bias", "mlp_bias",
                "hidden_act", "sliding_window", "use_sliding_window", "layer_types", "eos_token_id", "bos_token_id")


@pytest.mark.parametrize("case", list(FIELD_CASES))
def test_config_fields_match_transformers_and_round_trip(case, tmp_path):
    cfg_cls, model_cls, extra = FIELD_CASES[case]
    torch.manual_seed(0)
    hf = model_cls(cfg_cls(**(COMMON | extra | {"eos_token_id": [60, 96, 16]}))).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    tokens = np.random.default_rng(1).integers(0, COMMON["vocab_size"], size=(2, 40))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(tokens)))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4
    if "sliding_window" in extra:  # the KV-cached decode windows the same layers, past the window
        with torch.no_grad():
            ref_ids = hf.generate(torch.tensor(tokens[:1, :7]), max_new_tokens=16, min_new_tokens=16,
                                  do_sample=False, pad_token_id=0)[0, 7:].numpy()
        np.testing.assert_array_equal(generate(ours, [tokens[0, :7].tolist()], 16).tokens[0], ref_ids)

    save_pretrained(ours, tmp_path / "ours")
    back = model_cls.from_pretrained(tmp_path / "ours").eval()
    a, b = hf.config.to_dict(), back.config.to_dict()
    for d in (a, b):  # Qwen2Config has no head_dim field; the modeling code falls back to hidden / heads
        d["head_dim"] = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
    for key in COMPUTE_KEYS:
        if key in a or key in b:
            assert a.get(key) == b.get(key), (key, a.get(key), b.get(key))
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.tensor(tokens)).logits.numpy(), ref, atol=1e-5)
    assert from_pretrained(tmp_path / "ours").config == ours.config


def test_qwen2_window_applies_from_max_window_layers():
    from jaxeff.models.llama import LlamaConfig

    base = COMMON | {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8}
    assert LlamaConfig.from_hf(base | {"max_window_layers": 1}).layer_windows == (None, 8)
    assert LlamaConfig.from_hf(base | {"max_window_layers": 2}).layer_windows == (None, None)
    assert LlamaConfig.from_hf(base | {"use_sliding_window": False}).layer_windows == (None, None)
    assert LlamaConfig.from_hf(base).layer_windows == (None, None)  # Qwen2Config's max_window_layers is 28
    # layer_types (newer configs) wins over max_window_layers
    types = {"layer_types": ["sliding_attention", "full_attention"], "max_window_layers": 2}
    assert LlamaConfig.from_hf(base | types).layer_windows == (8, None)
    # Mistral windows every layer, and its default window is 4096; Llama has none
    assert LlamaConfig.from_hf(COMMON | {"model_type": "mistral"}).layer_windows == (4096, 4096)
    assert LlamaConfig.from_hf(COMMON | {"model_type": "llama", "sliding_window": 8}).layer_windows == (None, None)


@pytest.mark.parametrize("field, value, match", [
    ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, "dynamic"),
    ("rope_scaling", {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}, "longrope"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
     "partial_rotary_factor"),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor"),
    ("hidden_act", "gelu", "hidden_act"),
    ("model_type", "gemma2", "gemma2"),
])
def test_unsupported_config_fields_are_refused_by_name(field, value, match):
    from jaxeff.models.llama import LlamaConfig

    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf(COMMON | {"model_type": "llama", field: value})


def test_attention_fn_on_a_windowed_model_is_refused(tmp_path):
    from flax import nnx

    from jaxeff.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      model_type="mistral", sliding_window=4)
    with pytest.raises(ValueError, match="sliding_window=4"):
        Llama(cfg, rngs=nnx.Rngs(0))(jnp.zeros((1, 3), jnp.int32), attention_fn=lambda *a, **k: None)


def test_several_stop_ids_stop_where_transformers_stops(tmp_path):
    """A Llama-3 Instruct-style `eos_token_id` list: greedy decoding stops at whichever id comes first."""
    hf = _hf_model("llama", tmp_path / "plain")
    prompt = np.random.default_rng(1).integers(0, COMMON["vocab_size"], 7)
    with torch.no_grad():
        free = hf.generate(torch.tensor(prompt[None]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                           eos_token_id=None)[0, 7:].tolist()
    # stop on the third generated token, among two ids the model does not produce before it
    others = [t for t in range(COMMON["vocab_size"]) if t not in free[:3]][:2]
    stops = [others[0], others[1], free[2]]
    expected = free.index(free[2]) + 1
    hf.config.eos_token_id = hf.generation_config.eos_token_id = stops
    hf.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt[None]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 7:]
    assert len(ref) == expected <= 3

    ours = from_pretrained(tmp_path / "hf")
    assert ours.config.eos_token_id == tuple(stops)
    for eos in (ours.config.eos_token_id, stops, np.asarray(stops)):
        out = generate(ours, [prompt.tolist(), [3]], 8, eos_id=eos, pad_id=0)
        assert out.num_generated[0] == expected
        np.testing.assert_array_equal(out.tokens[0, :expected], ref.numpy())
        assert (out.tokens[0, expected:] == 0).all()
    save_pretrained(ours, tmp_path / "ours")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "ours").eos_token_id == stops


def test_generate_stops_at_generation_config_eos_like_transformers(tmp_path):
    """Released layout: generation_config.json's eos ids (a list) override config.json's and are `generate`'s
    default stop; transformers' default `generate` on the same checkpoint stops at the same tokens."""
    import json

    hf = _hf_model("llama", tmp_path)
    prompts = [[5, 9, 40, 3, 77, 12, 8], [60, 1, 33, 90]]
    with torch.no_grad():
        free = [hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                            eos_token_id=None)[0, len(p):].tolist() for p in prompts]
    a = free[0][2]  # row 0 stops at its third token, row 1 at the first later token that is neither a nor earlier
    j = next(i for i in range(1, 8) if free[1][i] != a and a not in free[1][:i + 1] and free[1][i] not in free[0][:3]
             and free[1][i] not in free[1][:i])
    b = free[1][j]
    assert a not in free[0][:2] and hf.config.eos_token_id not in free[0][:3] + free[1][:j + 1]
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [b, a]}))

    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ref = [ref_model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(p):]
               .tolist() for p in prompts]
    assert ref == [free[0][:3], free[1][:j + 1]]  # the checkpoint's ids, not config.json's, stopped transformers

    ours = from_pretrained(tmp_path)
    assert ours.config.generation_eos_token_id == (b, a) and ours.config.eos_token_id == hf.config.eos_token_id
    out = generate(ours, prompts, 8, pad_id=0)
    for row, want in enumerate(ref):
        assert out.num_generated[row] == len(want)
        np.testing.assert_array_equal(out.tokens[row, :len(want)], want)
        assert (out.tokens[row, len(want):] == 0).all()
    np.testing.assert_array_equal(generate(ours, prompts, 8, eos_id=None).tokens, free)  # None: never stop
    explicit = generate(ours, prompts, 8, eos_id=[free[0][0], free[1][0]])  # explicit ids win (same compile)
    assert explicit.num_generated.tolist() == [1, 1]
    save_pretrained(ours, tmp_path / "ours")  # the ids survive a save / load round trip, in their own file
    assert from_pretrained(tmp_path / "ours").config.generation_eos_token_id == (b, a)
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "ours").eos_token_id == [b, a]


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen2_windowed", "gemma2"])
def test_missing_config_keys_take_transformers_class_defaults(model_type):
    """A config.json with only the shape keys: every default jaxeff fills in (stop / bos ids, positions, KV heads,
    windows, eps, rope theta, tied embeddings) is the transformers config class's."""
    from jaxeff.models.gemma2 import Gemma2Config
    from jaxeff.models.llama import LlamaConfig, generation_stop_ids

    d = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=30, num_attention_heads=32,
             model_type=model_type.split("_")[0])
    if model_type == "qwen2_windowed":
        d["use_sliding_window"] = True  # window 4096 from max_window_layers 28 on
    hf = transformers.AutoConfig.for_model(**d)
    ours = (Gemma2Config if model_type == "gemma2" else LlamaConfig).from_hf(d)
    rope_theta = getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"]  # transformers 5: the latter
    for key in ("bos_token_id", "eos_token_id", "max_position_embeddings", "num_key_value_heads", "rms_norm_eps",
                "tie_word_embeddings", "initializer_range"):
        assert getattr(ours, key) == getattr(hf, key), (key, getattr(ours, key), getattr(hf, key))
    assert ours.rope_theta == rope_theta and ours.head_dim == (getattr(hf, "head_dim", None) or 64 // 32)
    assert generation_stop_ids(ours) == (() if hf.eos_token_id is None else (hf.eos_token_id,))
    if model_type == "gemma2":
        assert ours.pad_token_id == hf.pad_token_id and ours.sliding_window == hf.sliding_window
        return
    types = getattr(hf, "layer_types", None) or ["sliding_attention"] * d["num_hidden_layers"]
    window = getattr(hf, "sliding_window", None)
    assert ours.layer_windows == tuple(window if t == "sliding_attention" else None for t in types)
