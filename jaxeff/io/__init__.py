"""Weight loading: safetensors files and Hugging Face-format model directories."""

from jaxeff.io.safetensors import load_checkpoint_dir, load_file, save_checkpoint_dir, save_file

__all__ = ["load_file", "save_file", "load_checkpoint_dir", "save_checkpoint_dir", "from_pretrained", "save_pretrained"]


def __getattr__(name):
    # Lazy: the HF loader imports the model zoo, which safetensors users (DC-AE, HART) do not need.
    if name in ("from_pretrained", "save_pretrained"):
        from jaxeff.io import hf

        return getattr(hf, name)
    raise AttributeError(name)
