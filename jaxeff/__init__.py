"""jaxeff: efficient-AI methods in JAX / Flax NNX."""

__version__ = "0.1.0"
