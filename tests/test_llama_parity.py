"""Logit and greedy-decode parity with transformers' PyTorch Llama / Mistral / Qwen2 (tiny random configs)."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxeff.io import from_pretrained, save_pretrained  # noqa: E402
from jaxeff.io.hf import CheckpointMismatchError  # noqa: E402
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
    out = generate(ours, [prompt.tolist()], 32)
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
