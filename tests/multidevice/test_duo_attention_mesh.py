"""DuoAttention gate training data parallel on a 4-device mesh equals the one-device result."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxeff import distributed
from jaxeff import duo_attention as da
from jaxeff.models.llama import Llama, LlamaConfig

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (tests/multidevice conftest)")


def test_train_gates_on_a_mesh_equals_one_device():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    model = Llama(cfg, rngs=nnx.Rngs(0))

    def batches():
        rng = np.random.default_rng(0)
        while True:
            mask = np.zeros((4, 32), np.float32)
            mask[:, -4:] = 1
            yield {"tokens": rng.integers(0, 64, (4, 32)), "mask": mask}

    gcfg = da.GateTrainConfig(sink=2, recent=4, steps=3, mask_block=2)
    one = da.train_gates(model, batches(), gcfg)
    many = da.train_gates(model, batches(), gcfg, mesh=distributed.make_mesh(devices=jax.devices()[:4]))
    np.testing.assert_allclose(many, one, atol=1e-6)
    assert np.abs(one - 1).max() > 1e-3  # the gates moved
