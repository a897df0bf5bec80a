"""make bench name=llama_decode: greedy decode tokens/s, jaxeff (compiled prefill + lax.scan decode loop) vs
transformers (PyTorch eager, same weights), same tiny random config and batch, printed side by side.

Overrides: `python -m benchmarks.llama_decode batch=4 prompt=64 new_tokens=128 repeats=3`.
"""

from __future__ import annotations

import sys
import tempfile
import time

import jax
import numpy as np


def main(argv: list[str]) -> None:
    opts = {"batch": 4, "prompt": 64, "new_tokens": 128, "repeats": 3, "hidden": 256, "layers": 4}
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in opts:
            raise SystemExit(f"unknown option {key!r}; options: {sorted(opts)}")
        opts[key] = int(value)
    import torch
    import transformers

    from jaxeff.io import from_pretrained
    from jaxeff.models.llama import generate

    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=opts["hidden"], intermediate_size=3 * opts["hidden"],
                                   num_hidden_layers=opts["layers"], num_attention_heads=8, num_key_value_heads=4,
                                   max_position_embeddings=4096)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = from_pretrained(d)
    # Same device class on both sides: PyTorch on CUDA when jax runs on a GPU.
    torch_device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    hf = hf.to(torch_device)
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls in TF32, as jax does on a GPU by default
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, size=(opts["batch"], opts["prompt"]))
    n = opts["new_tokens"]

    def run_jax():
        return generate(ours, prompts.tolist(), n, eos_id=None).tokens  # min_new_tokens=n on the torch side

    def run_torch():
        with torch.no_grad():
            out = hf.generate(torch.tensor(prompts, device=torch_device), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)
        return out[:, opts["prompt"]:].cpu().numpy()  # .cpu() waits for the GPU

    same = np.array_equal(run_jax(), run_torch())  # also warms up / compiles

    def best(fn):
        times = []
        for _ in range(opts["repeats"]):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    t_jax, t_torch = best(run_jax), best(run_torch)
    tokens = opts["batch"] * n
    print(f"jax device: {jax.devices()[0].device_kind}; torch device: {torch_device} "
          f"({torch.get_num_threads()} threads); config: {opts}")
    print(f"greedy outputs identical: {same}")
    print(f"{'implementation':<28}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'transformers (PyTorch)':<28}{t_torch:>10.3f}{tokens / t_torch:>12.1f}")
    print(f"{'jaxeff (jit + scan)':<28}{t_jax:>10.3f}{tokens / t_jax:>12.1f}")
    print(f"speed-up jaxeff / transformers: {t_torch / t_jax:.2f}x (prefill {opts['prompt']} + {n} decode steps)")


if __name__ == "__main__":
    main(sys.argv[1:])
