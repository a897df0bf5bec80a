"""HART: hybrid autoregressive text-to-image generation (mit-han-lab/hart) in JAX / Flax NNX.

Parts: `tokenizer` (multi-scale residual VQ-VAE + continuous residual), `transformer` (scalable-resolution AR
transformer with KV-cached multi-scale generation), `diffusion` (residual MLP diffusion head), `text` (Qwen2 text
encoder), `loading` (released checkpoint layout), `macs` (analytic cost model vs a DiT baseline), `dit` (the
matched DiT-style diffusion baseline), `tiny` (the whole pipeline trained from scratch on sklearn digits, CPU).
"""

from jaxeff.hart.pipeline import HART
from jaxeff.hart.tokenizer import HARTTokenizer, TokenizerConfig
from jaxeff.hart.transformer import HARTConfig, HARTTransformer, SampleOptions

__all__ = ["HART", "HARTConfig", "HARTTokenizer", "HARTTransformer", "SampleOptions", "TokenizerConfig"]
