"""NVILA (NVlabs/VILA) in JAX: Dynamic-S2 / dynamic tiling, scale merge, projectors, and the VLM."""
