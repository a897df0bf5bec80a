"""HART: hybrid autoregressive text-to-image generation (mit-han-lab/hart) in JAX / Flax NNX."""
