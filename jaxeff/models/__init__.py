"""Shared model zoo: the Llama/Mistral/Qwen2 decoder (and vision encoders)."""
