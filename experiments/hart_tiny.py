"""hart_tiny: the whole HART pipeline trained from scratch on scikit-learn's 8x8 digits (upsampled), class-
conditioned: (1) VQ tokenizer, discrete-only; (2) hybrid decoder fine-tuning (encoder/codebook frozen, residual
dropped with p=0.5); (3) AR transformer + residual diffusion head. Reports reconstruction PSNR discrete-only vs
hybrid with the true residual vs hybrid with a residual sampled by the diffusion head, and a generated grid.
The pipeline is `jaxeff.hart.tiny.run_tiny`.
"""

from __future__ import annotations

from jaxeff.experiment import Run, register
from jaxeff.hart.tiny import TINY_PRESETS, TinyConfig, run_tiny


@register("hart_tiny", TinyConfig, presets=TINY_PRESETS)
def run(cfg: TinyConfig, run: Run) -> None:
    """HART (tokenizer + AR transformer + residual diffusion) trained from scratch on sklearn digits."""
    run_tiny(cfg, run)
