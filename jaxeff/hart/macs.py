"""Analytic multiply-accumulate counts for HART generation and the matched DiT baseline.

Counts the matmuls (linear layers, attention scores and values, Phi convs, the diffusion head), which is what the
HART paper's MAC comparison counts; elementwise work, norms and softmax are ignored. Checked against XLA's
`cost_analysis()` flop count on small configs in tests/test_hart_macs.py.
"""

from __future__ import annotations

from jaxeff.hart.dit import DiTConfig
from jaxeff.hart.transformer import HARTConfig


def hart_macs(cfg: HARTConfig, batch: int = 1, guidance: bool = True) -> dict[str, float]:
    """MACs of one `generate_fhat` call (KV-cached, CFG doubles the batch), split by part."""
    b = batch * (2 if guidance else 1)
    c, hf, v, cv = cfg.embed_dim, cfg.ffn_hidden, cfg.vocab_size, cfg.cvae
    pns = cfg.patch_nums
    tr = head = other = 0
    kv = 0
    for si, pn in enumerate(pns):
        n = cfg.context_token if si == 0 else pn * pn
        kv += n
        per_layer = n * (4 * c * c + 3 * c * hf) + 2 * n * kv * c + 6 * c * c
        tr += cfg.depth * per_layer * b
        head += ((1 if si == 0 else n) * c * v + 2 * c * c) * b
        if si < len(pns) - 1:  # next-scale input: word_embed of the area-downsampled f_hat, and a Phi conv at HxW
            other += pns[si + 1] ** 2 * cv * c * b + 9 * cv * cv * pns[-1] ** 2 * batch
    other += cfg.context_token * cfg.context_dim * c * b
    n_last = pns[-1] ** 2
    w = cfg.diff_width
    per_tok = cv * w + 256 * w + w * w + c * w + cfg.diff_depth * 5 * w * w + 2 * w * w + w * 2 * cv
    diffusion = per_tok * n_last * b * cfg.num_sampling_steps + n_last * (cv * c) * b  # + word_embed of the codes
    return {"transformer": tr, "head": head, "diffusion": diffusion, "other": other,
            "total": tr + head + diffusion + other}


def dit_macs(cfg: DiTConfig, steps: int = 20, batch: int = 1, guidance: bool = True) -> dict[str, float]:
    """MACs of `ddim_sample` (each step one forward on the doubled batch)."""
    b = batch * (2 if guidance else 1)
    c = cfg.hidden
    n = cfg.num_patches + cfg.context_token
    hm = int(c * cfg.mlp_ratio)
    pin = cfg.patch**2 * cfg.in_channels
    per_fwd = cfg.depth * (n * (4 * c * c + 2 * c * hm) + 2 * n * n * c + 6 * c * c)
    per_fwd += cfg.num_patches * pin * c * 2 + cfg.context_token * cfg.context_dim * c + 256 * c + c * c + 2 * c * c
    total = per_fwd * b * steps
    return {"per_forward": per_fwd * b, "total": total}


def param_count(tree) -> int:
    import jax

    return int(sum(x.size for x in jax.tree.leaves(tree)))
