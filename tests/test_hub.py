"""`hf:` names: one download helper (`jaxeff.io.hub`) behind every loader; no network is used here."""

import json
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

from jaxeff.io import from_pretrained, hub, save_pretrained
from jaxeff.models.llama import Llama, LlamaConfig


def test_parse_names():
    assert hub.parse("hf:a/b") == ("a/b", None, "")
    assert hub.parse("hf:a/b@v2/sub/dir") == ("a/b", "v2", "sub/dir")
    for bad in ("hf:a", "hf:/b", "a/b"):
        with pytest.raises(ValueError, match="is not 'hf:"):
            hub.parse(bad)
    assert not hub.is_hub_name(hub.resolve.__code__.co_filename)  # a plain path stays a path


def test_from_pretrained_downloads_only_the_model_files(tmp_path, monkeypatch):
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=(3, 7))
    model = Llama(cfg, rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path / "served")
    calls = []

    def fake_snapshot(repo_id, revision=None, allow_patterns=None, cache_dir=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(tmp_path / "served")

    monkeypatch.setattr(hub, "_snapshot", fake_snapshot)
    loaded = from_pretrained("hf:someone/tiny-llama@main")
    assert calls == [("someone/tiny-llama", "main", list(hub.HF_MODEL_FILES))]
    tokens = jnp.array([[1, 2, 3, 4]])
    np.testing.assert_allclose(loaded(tokens), model(tokens), rtol=1e-6)
    assert json.loads((tmp_path / "served" / "config.json").read_text())["eos_token_id"] == [3, 7]


_RESPONSE = types.SimpleNamespace(headers={}, status_code=403, url="https://huggingface.co/a/b", request=None)


@pytest.mark.parametrize("make_error, kind, message", [
    (lambda: LocalEntryNotFoundError("no network and nothing cached"), ConnectionError,
     "seems offline.*hf download a/b"),
    (lambda: GatedRepoError("gated", response=_RESPONSE), PermissionError, "gated.*HF_TOKEN"),
    (lambda: RepositoryNotFoundError("404", response=_RESPONSE), FileNotFoundError, "no such repository"),
], ids=["offline", "gated", "unknown"])
def test_errors_say_what_to_do(monkeypatch, make_error, kind, message):
    def failing(*args, **kwargs):
        raise make_error()

    monkeypatch.setattr(hub, "_snapshot", failing)
    with pytest.raises(kind, match=message):
        hub.resolve("hf:a/b/weights.safetensors")


def test_a_path_missing_from_the_snapshot_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "_snapshot", lambda *a, **k: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no 'model.pt'"):
        hub.resolve("hf:a/b/model.pt")


def test_dcae_from_a_hub_name(tmp_path, monkeypatch):
    import dataclasses

    from jaxeff.dcae import DCAE, get_config
    from jaxeff.dcae.weights import torch_state
    from jaxeff.io.safetensors import save_file

    cfg = dataclasses.replace(get_config("dc-ae-f32c32-sana-1.1"), attention_head_dim=8,
                              encoder_block_out_channels=(8, 16, 16, 32, 32, 32),
                              decoder_block_out_channels=(8, 16, 16, 32, 32, 32),
                              encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6)
    model = DCAE.random(cfg, seed=0)
    save_file(torch_state(model), tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_diffusers()))
    calls = []
    monkeypatch.setattr(hub, "_snapshot",
                        lambda repo, **kw: calls.append((repo, kw["allow_patterns"])) or str(tmp_path))
    loaded = DCAE.from_pretrained("hf:someone/tiny-dc-ae-diffusers")
    assert calls == [("someone/tiny-dc-ae-diffusers", ["*.json", "*.safetensors"])]
    assert loaded.config == model.config
    np.testing.assert_array_equal(np.asarray(nnx.state(loaded, nnx.Param)["encoder"]["conv_in"]["weight"][...]),
                                  np.asarray(nnx.state(model, nnx.Param)["encoder"]["conv_in"]["weight"][...]))


def test_hub_name_without_prefix_gets_a_hint(tmp_path, monkeypatch):
    from jaxeff.io import from_pretrained

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="for a Hugging Face Hub repo pass 'hf:meta-llama/Llama-3.2-1B'"):
        from_pretrained("meta-llama/Llama-3.2-1B")
    with pytest.raises(FileNotFoundError, match="does not exist$"):
        from_pretrained(str(tmp_path / "missing"))
