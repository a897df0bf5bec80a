"""The Pallas kernels lower for TPU (Pallas -> Mosaic) and NVIDIA GPU (Pallas -> Triton) from this CPU machine.

`jax.export` runs the Pallas lowering for a named platform without the device, so block-shape, scalar-prefetch
and Triton-dialect errors show up here; the final Mosaic / Triton compilation still needs the hardware.
Newer jax (0.12) asks for the target GPU when lowering Triton: we name an abstract H100 (`_gpu_target`).
"""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from jaxeff.nn.attention import attention
from pallas_kernels.hybrid_attention import _pallas_hybrid, make_config
from pallas_kernels.sparse_decode import _DecodeCfg, _pallas_gpu_decode, _pallas_tpu_decode, decode_page_lists

PLATFORMS = {"tpu": "tpu", "gpu": "cuda"}
TRITON_CALL = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


@pytest.fixture
def fake_tpu_info(monkeypatch):
    # Mosaic lowering asks the local device for TPU generation info; pretend to be a v5e.
    tpu_info = pytest.importorskip("jax._src.pallas.mosaic.tpu_info")
    if not hasattr(tpu_info, "registry"):
        pytest.skip("this jax has no TPU info registry to describe a v5e")
    monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1))


@contextlib.contextmanager
def _gpu_target():
    """An abstract NVIDIA H100 as the lowering target where jax reads it (jax without `AbstractDevice` lowers
    Triton without asking for a device)."""
    device_cls = getattr(jax.sharding, "AbstractDevice", None)
    if device_cls is None:
        yield
        return
    fields = {f.name for f in dataclasses.fields(device_cls)}
    kw = dict(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
    device = device_cls(**{k: v for k, v in kw.items() if k in fields})
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        yield


def _lower(fn, platform, *shapes):
    with _gpu_target() if platform == "gpu" else contextlib.nullcontext():
        exported = export.export(jax.jit(fn), platforms=[PLATFORMS[platform]],
                                 disabled_checks=[TRITON_CALL])(*shapes)
        return exported.mlir_module()


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("d,dtype", [(128, jnp.bfloat16), (64, jnp.float32)])
def test_pallas_hybrid_attention_lowers(fake_tpu_info, platform, d, dtype):
    q = jax.ShapeDtypeStruct((1, 1000, 8, d), dtype)
    k = jax.ShapeDtypeStruct((1, 1000, 2, d), dtype)
    flags, cfg = make_config(q, k, np.array([True, False]), sink=64, local=256, q_offset=0, scale=None,
                             block_q=128, block_k=128)

    def fwd_bwd(q, k, v):  # forward, dq and dk/dv kernels
        out, vjp = jax.vjp(lambda q, k, v: _pallas_hybrid(q, k, v, flags, cfg, platform, False), q, k, v)
        return out, vjp(out)

    text = _lower(fwd_bwd, platform, q, k, k)
    assert text.count("tpu_custom_call" if platform == "tpu" else "xla.gpu.triton") == 3


# HART's last 1024px scale with CFG in the batch: 4096 queries over the 9750 cached keys, 16 heads of 64, bf16.
HART_Q = jax.ShapeDtypeStruct((2, 4096, 16, 64), jnp.bfloat16)
HART_KV = jax.ShapeDtypeStruct((2, 9750, 16, 64), jnp.bfloat16)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_pallas_hybrid_attention_non_causal_lowers_at_hart_shape(fake_tpu_info, platform):
    flags, cfg = make_config(HART_Q, HART_KV, np.zeros(16, bool), sink=0, local=1, q_offset=0, scale=None,
                             block_q=128, block_k=128, causal=False)

    def fwd_bwd(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: _pallas_hybrid(q, k, v, flags, cfg, platform, False), q, k, v)
        return out, vjp(out)

    text = _lower(fwd_bwd, platform, HART_Q, HART_KV, HART_KV)
    assert text.count("tpu_custom_call" if platform == "tpu" else "xla.gpu.triton") == 3


def test_pallas_front_door_non_causal_lowers_for_tpu(fake_tpu_info, monkeypatch):
    # The front door's "pallas" at HART's last scale, dispatched as on a TPU backend (jax.default_backend patched:
    # the lowering runs on this CPU): one Mosaic kernel; the default (None) stays on XLA.
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    for impl, kernels in (("pallas", 1), (None, 0)):
        text = _lower(lambda q, k, v, impl=impl: attention(q, k, v, causal=False, scale=0.03, implementation=impl),
                      "tpu", HART_Q, HART_KV, HART_KV)
        assert text.count("tpu_custom_call") == kernels, impl


def _jaxpr_on(monkeypatch, backend, make_module, call, *args):
    """The jaxpr of `call(module, *args)` for a bf16 module built abstractly, traced as on `backend`
    (`jax.default_backend` patched)."""
    from flax import nnx

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    graph, state = nnx.split(nnx.eval_shape(lambda: make_module(nnx.Rngs(0), dtype=jnp.bfloat16,
                                                                param_dtype=jnp.bfloat16)))
    # a fresh function per call: make_jaxpr caches traces by function
    return jax.make_jaxpr(lambda state, *a: call(nnx.merge(graph, state), *a))(state, *args)


@pytest.mark.parametrize("backend", ["tpu", "cpu"])
def test_pallas_hart_last_scale_attention_is_one_kernel_call_on_tpu(monkeypatch, backend):
    # HART's released-size attention layer at the last 1024px scale (q_chunk="auto", bf16): on a TPU backend it
    # picks the Pallas kernel (`kernel_default`), so the queries are not chunked; on CPU (XLA) they are (lax.map).
    from jaxeff.hart.transformer import Attention, HARTConfig

    cfg, n = HARTConfig(), 4096

    def layer(module, x, k, v):
        cos = jnp.ones(x.shape[:2] + (cfg.head_dim,))
        return module(x, cos, jnp.zeros_like(cos), past=(k, v), q_chunk="auto")[0]

    past = jax.ShapeDtypeStruct((2, cfg.seq_len - n, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
    jaxpr = _jaxpr_on(monkeypatch, backend, lambda rngs, **dt: Attention(cfg, rngs, **dt), layer,
                      jax.ShapeDtypeStruct((2, n, cfg.embed_dim), jnp.bfloat16), past, past)
    names = [e.primitive.name for e in jaxpr.eqns]
    assert ("hybrid_attention_tpu" in str(jaxpr)) == (backend == "tpu")
    assert ("scan" in names) == (backend == "cpu")


@pytest.mark.parametrize("backend", ["tpu", "cpu"])
def test_pallas_dit_baseline_takes_the_same_kernel_as_hart(monkeypatch, backend):
    # The matched DiT baseline's self-attention (4396 tokens at 1024px) makes the same `kernel_default` choice as
    # HART's cached attention, so a HART/DiT speed ratio compares like with like.
    from jaxeff.hart.dit import DiTBlock, DiTConfig

    cfg = DiTConfig()
    jaxpr = _jaxpr_on(monkeypatch, backend, lambda rngs, **dt: DiTBlock(cfg, rngs, **dt), lambda m, x, c: m(x, c),
                      jax.ShapeDtypeStruct((2, 4396, cfg.hidden), jnp.bfloat16),
                      jax.ShapeDtypeStruct((2, cfg.hidden), jnp.bfloat16))
    assert ("hybrid_attention_tpu" in str(jaxpr)) == (backend == "tpu")


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_pallas_sparse_paged_decode_lowers(fake_tpu_info, platform):
    b, hkv, g, d, pages, page, max_pages = 2, 2, 4, 128, 64, 64, 16
    shapes = (jax.ShapeDtypeStruct((b, hkv * g, d), jnp.bfloat16),
              jax.ShapeDtypeStruct((hkv, pages, page, d), jnp.bfloat16),
              jax.ShapeDtypeStruct((hkv, pages, page, d), jnp.bfloat16),
              jax.ShapeDtypeStruct((b, max_pages), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32),
              jax.ShapeDtypeStruct((b, hkv, 4), jnp.int32))
    stream = np.array([True, False])
    kernel = _pallas_tpu_decode if platform == "tpu" else _pallas_gpu_decode

    def step(q, kp, vp, table, lengths, selected):
        lists = decode_page_lists(table, lengths, selected, stream, sink=64, local=256, page_size=page)
        return kernel(q, kp, vp, table, lengths, lists, jnp.asarray(stream, jnp.int32),
                      _DecodeCfg(64, 256, d**-0.5, page), False)

    text = _lower(step, platform, *shapes)
    assert ("tpu_custom_call" if platform == "tpu" else "xla.gpu.triton") in text
