"""DuoAttention: released patterns, pattern files, head selection, gate training, dual KV cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels
from jaxeff import duo_attention as da
from jaxeff.models.llama import Llama, LlamaConfig
from jaxeff.models.llama import generate as dense_generate

# Share of heads with alpha > 0.5 in the released files (computed independently; see the reference notes).
RELEASED = {"Llama-2-7B-32K-Instruct": ((32, 32), 0.43), "Llama-3-8B-Instruct-Gradient-1048k": ((32, 8), 0.81),
            "Meta-Llama-3.1-8B-Instruct": ((32, 8), 0.91), "Mistral-7B-Instruct-v0.2": ((32, 8), 0.95),
            "Mistral-7B-Instruct-v0.3": ((32, 8), 0.94), "Llama-3-8B-Instruct-Gradient-4194k": ((32, 8), None)}


@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    return Llama(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_patterns_load_unchanged(name, shared_data):
    folder = shared_data("duo_attention_patterns") / name
    alpha, sink, recent = da.load_pattern(folder)
    shape, share = RELEASED[name]
    raw = np.loadtxt(folder / "full_attention_heads.tsv", delimiter="\t")
    assert alpha.shape == shape and (sink, recent) == (128, 256)
    np.testing.assert_allclose(alpha, np.clip(raw, 0, 1), atol=1e-7)
    if share is not None:
        assert abs(float((alpha > 0.5).mean()) - share) < 0.005
    keep = da.select_retrieval_heads(alpha, 0.5)
    assert keep.sum() == alpha.size // 2
    assert alpha[keep].min() >= alpha[~keep].max()


def test_pattern_round_trip_and_shape_errors(tmp_path, model):
    alpha = np.random.default_rng(0).uniform(-0.01, 1.01, (2, 2)).astype(np.float32)
    da.save_pattern(tmp_path / "p", alpha, 4, 16, lr=0.02)
    loaded, sink, recent = da.load_pattern(tmp_path / "p")
    np.testing.assert_array_equal(loaded, np.clip(alpha, 0, 1))
    assert (sink, recent) == (4, 16)
    released = np.full((32, 8), 0.7, np.float32)  # the shape of the Llama-3.1-8B pattern
    with pytest.raises(ValueError, match="32 layers x 8 KV heads|shape \\(32, 8\\)"):
        da.check_pattern(released, model.config.num_hidden_layers, model.config.num_key_value_heads)
    with pytest.raises(ValueError, match="retrieval_heads has shape"):
        da.generate(model, [[1, 2, 3]], 2, retrieval_heads=released > 0.5, sink=4, recent=8)
    with pytest.raises(FileNotFoundError, match="full_attention_heads.tsv"):
        da.load_pattern(tmp_path)


def test_pattern_names_download_once_into_the_cache(tmp_path, monkeypatch):
    """Released patterns by name, without network: the downloaders are replaced by copies from a local folder."""
    import shutil

    from jaxeff.duo_attention import pattern
    from jaxeff.io import hub

    alpha = np.random.default_rng(1).uniform(0, 1, (32, 8))
    served = da.save_pattern(tmp_path / "served", alpha, 128, 256)
    urls = []

    def fake_download(url, dest):
        urls.append(url)
        dest.write_bytes((served / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(pattern, "_download", fake_download)
    assert da.RELEASED_PATTERNS is pattern.RELEASED_PATTERNS and da.resolve_pattern is pattern.resolve_pattern
    assert set(da.RELEASED_PATTERNS) == set(RELEASED)  # every released model has a name
    name = da.RELEASED_PATTERNS["Meta-Llama-3.1-8B-Instruct"]
    for source in (name, "Meta-Llama-3.1-8B-Instruct"):  # the second load (by the released key) reads the cache
        loaded, sink, recent = da.load_pattern(source, cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(loaded, alpha.astype(np.float32))
    assert (sink, recent) == (128, 256)
    base = "https://raw.githubusercontent.com/mit-han-lab/duo-attention/main/attn_patterns/" \
           "Meta-Llama-3.1-8B-Instruct/lr=0.02-reg=0.05-ctx=1000_128000-multi_passkey10/"
    assert urls == [base + "full_attention_heads.tsv", base + "config.json"]

    calls = []

    def fake_snapshot(repo_id, revision=None, allow_patterns=None, cache_dir=None):
        calls.append((repo_id, revision, allow_patterns))
        snapshot = tmp_path / "hf_snapshot"
        shutil.copytree(served, snapshot / "llama" / "run1", dirs_exist_ok=True)
        return str(snapshot)

    monkeypatch.setattr(hub, "_snapshot", fake_snapshot)
    loaded, _, _ = da.load_pattern("hf:someone/duo-patterns@v1/llama/run1")
    np.testing.assert_allclose(loaded, alpha.astype(np.float32))
    assert calls == [("someone/duo-patterns", "v1",
                      ["llama/run1/full_attention_heads.tsv", "llama/run1/config.json"])]
    assert pattern.parse_pattern_name("github:a/b@dev/x/y") == ("github", "a/b", "dev", "x/y")
    for bad in ("github:mit-han-lab/duo-attention", "hf:repo/only", "s3:a/b/c"):
        with pytest.raises(ValueError, match="is not 'hf:"):
            pattern.parse_pattern_name(bad)


def test_pattern_names_offline_error(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    from huggingface_hub.errors import LocalEntryNotFoundError

    from experiments.duo_attention_passkey import Config
    from jaxeff.duo_attention import pattern
    from jaxeff.io import hub

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    name = pattern.RELEASED_PATTERNS["Mistral-7B-Instruct-v0.2"]
    with pytest.raises(ConnectionError, match="seems offline.*pass the local directory"):
        da.load_pattern(name, cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written in the cache, not even empty folders

    def hf_offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(hub, "_snapshot", hf_offline)
    with pytest.raises(ConnectionError, match="seems offline"):
        da.load_pattern("hf:someone/duo-patterns/llama", cache_dir=tmp_path)
    Config(pattern=name).validate()  # the experiments take names (downloaded in the run, not at validation)
    with pytest.raises(ValueError, match="is not 'hf:"):
        Config(pattern="github:mit-han-lab/duo-attention").validate()


def test_gate_training_separates_heads(model):
    """KV head 1 of every layer writes nothing (zero value projection), so only the regulariser acts on its gate
    and it must fall; KV head 0 carries the long-range signal the streaming mask cuts, so its gate stays high."""
    cfg = model.config
    m = nnx.clone(model)  # the module-scoped model stays untouched
    for layer in m.layers:
        kernel = layer.self_attn.v_proj.kernel
        kernel[...] = kernel[...].at[:, cfg.head_dim:].set(0.0)  # KV head 1
        layer.self_attn.k_proj.kernel[...] = layer.self_attn.k_proj.kernel[...] * 20.0  # peaky, long-range heads
    rng = np.random.default_rng(0)

    def batches():
        while True:
            tokens = rng.integers(0, cfg.vocab_size, (4, 64))
            mask = np.zeros((4, 64), np.float32)
            mask[:, -8:] = 1
            yield {"tokens": tokens, "mask": mask}

    # The official block mask scaled to 2-token blocks: 1 sink block, 2 local blocks (3-4 recent tokens).
    alpha = da.train_gates(m, batches(), da.GateTrainConfig(sink=2, recent=4, steps=60, mask_block=2))
    # Raw gates after the last (unclamped) step, as the official TSVs: within one step of [0, 1].
    assert alpha.shape == (2, 2) and (alpha >= -0.03).all() and (alpha <= 1.03).all()
    assert alpha[:, 1].max() < 0.3, alpha
    assert alpha[:, 0].min() > 0.6, alpha


def test_dual_cache_equals_dense_when_window_covers_context(model):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 64, n).tolist() for n in (37, 20, 50)]
    ref = dense_generate(model, prompts, 6).tokens
    mask = np.array([[True, False], [False, True]])
    out = da.generate(model, prompts, 6, retrieval_heads=mask, sink=4, recent=60, chunk_size=16)
    np.testing.assert_array_equal(out.tokens, ref)


def test_dual_cache_generation_stops_at_any_of_several_stop_ids(model):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 64, n).tolist() for n in (37, 20, 50)]
    free = dense_generate(model, prompts, 6).tokens
    stops = [int(free[0, 2]), int(free[1, 1])]  # row 0 stops at its third token at the latest, row 1 at its second
    ref = dense_generate(model, prompts, 6, eos_id=stops, pad_id=63)
    assert ref.num_generated[0] <= 3 and ref.num_generated[1] <= 2
    mask = np.array([[True, False], [False, True]])
    out = da.generate(model, prompts, 6, retrieval_heads=mask, sink=4, recent=60, chunk_size=16, eos_id=stops,
                      pad_id=63)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.num_generated, ref.num_generated)
    # The checkpoint's stop ids by default (generation_config.json's over config.json's, as llama.generate); the
    # same weights under a config that names them. eos_id=None still never stops.
    cfg = dataclasses.replace(model.config, eos_token_id=5, generation_eos_token_id=tuple(stops))
    eos_model = nnx.merge(nnx.graphdef(Llama(cfg, rngs=nnx.Rngs(0))), nnx.state(model))
    kw = dict(retrieval_heads=mask, sink=4, recent=60, chunk_size=16, pad_id=63)
    default = da.generate(eos_model, prompts, 6, **kw)
    np.testing.assert_array_equal(default.tokens, ref.tokens)
    np.testing.assert_array_equal(default.num_generated, ref.num_generated)
    np.testing.assert_array_equal(da.generate(eos_model, prompts, 6, eos_id=None, **kw).tokens, free)
    with pytest.raises(TypeError, match="eos_id"):
        da.generate(eos_model, prompts, 6, eos_id="eos", **kw)


def test_dual_cache_chunked_prefill_is_lambda_sparse_from_first_chunk(model):
    """The token window: chunked prefill through the dual cache equals one-shot hybrid (Λ) attention, and stores
    the formula's bytes."""
    mask = np.array([[True, False], [False, False]])
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 48)))

    def hybrid(layer, q, k, v, *, q_positions, kv_positions):
        return pallas_kernels.hybrid_attention(q, k, v, streaming_heads=~mask[layer], sink=4, local=8)

    graphdef, state = nnx.split(model)
    ref = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, attention_fn=hybrid))(state, tokens)
    chunk_fn = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s)(t, p, cache=c))
    cache = da.DualKVCache.init(mask, 2, 48, model.config.head_dim, sink=4, recent=8, window="token")
    outs = []
    for c in range(0, 48, 16):
        logits, cache = chunk_fn(state, tokens[:, c:c + 16], jnp.broadcast_to(jnp.arange(c, c + 16), (2, 16)), cache)
        outs.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(ref), atol=2e-5)
    ratio = cache.kv_nbytes() / cache.dense_kv_nbytes()
    assert ratio == pytest.approx(da.kv_cache_ratio(mask.mean(), 4, 8, 48))
    # Full attention differs: the streaming heads really are sparse.
    assert float(jnp.abs(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens) - ref).max()) > 1e-3


@pytest.mark.parametrize("name", ["duo_attention_passkey", "lserve_needle"])
def test_passkey_experiments_check_model_and_pattern_up_front(name, tmp_path):
    """Both passkey experiments validate model= / pattern= with `evaluation.check_model_and_pattern` before any run
    directory exists."""
    from jaxeff.duo_attention.evaluation import check_model_and_pattern, resolve_model
    from jaxeff.experiment import ExperimentError, get, make_config

    exp = get(name)
    (tmp_path / "model").mkdir()
    (tmp_path / "pattern").mkdir()
    for overrides, fragment in [({"model": str(tmp_path / "model")}, "no config.json"),
                                ({"pattern": str(tmp_path / "pattern")}, "no full_attention_heads.tsv"),
                                ({"pattern": "hf:"}, "is not 'hf:"), ({"require_model": "true"}, "this preset needs")]:
        with pytest.raises(ExperimentError, match=fragment):
            make_config(exp, "smoke", overrides)
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "pattern" / "full_attention_heads.tsv").write_text("1\t1\n")
    check_model_and_pattern(str(tmp_path / "model"), str(tmp_path / "pattern"), require_model=True)
    assert make_config(exp, "smoke", {"model": str(tmp_path / "model")}).model == str(tmp_path / "model")
    assert resolve_model(str(tmp_path / "model"), run=None)[0] == str(tmp_path / "model")  # given: no training


def test_lserve_needle_takes_only_a_pattern_of_its_own_checkpoint(tmp_path):
    """lserve_needle's default pattern: the newest duo_attention_passkey pattern identified on the same model (under
    the same runs root), never a newer one of another model with the same head count."""
    from types import SimpleNamespace

    from experiments.lserve_needle import Config, find_pattern

    runs = tmp_path / "runs"
    for stamp, model_dir, value in [("1", "ckpt/a", 0.25), ("2", "ckpt/b", 0.75)]:
        da.save_pattern(runs / "duo_attention_passkey" / stamp / "pattern", np.full((2, 2), value), 16, 64,
                        model_name=str(tmp_path / model_dir))
    run = SimpleNamespace(dir=runs / "lserve_needle" / "3", is_main=True)
    alpha, source = find_pattern(Config(), None, str(tmp_path / "ckpt" / "a"), run)
    np.testing.assert_array_equal(alpha, np.full((2, 2), 0.25))
    assert str(runs / "duo_attention_passkey" / "1" / "pattern") in source
