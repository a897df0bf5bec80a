"""HART text encoding: our Qwen2 path (system prompt, right padding to max_length, masked pad keys) against
Hugging Face transformers' Qwen2 with the same attention mask, on a tiny random model and a local tokenizer."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from jaxeff.hart.text import SYSTEM_PROMPT, TextEncoder  # noqa: E402

WORDS = "a cat dog red blue sleeping on the mat sky prompt user".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2tiny")
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(d)
    cfg = transformers.Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    return d


def _reference(model_dir, prompts, max_length):
    """The reference `encode_prompts` with use_llm_system_prompt=True, through Hugging Face Qwen2."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    lm = transformers.AutoModel.from_pretrained(model_dir).eval()
    ids = torch.stack([tok(p, return_tensors="pt", padding="max_length", max_length=max_length,
                           truncation=True).input_ids[0] for p in prompts])
    mask = ids != tok.pad_token_id
    sys_ids = tok(SYSTEM_PROMPT, return_tensors="pt").input_ids.repeat(len(prompts), 1)
    with torch.no_grad():
        h = lm(torch.cat([sys_ids, ids], 1), attention_mask=torch.cat([torch.ones_like(sys_ids).bool(), mask], 1),
               output_hidden_states=True).hidden_states[-1][:, sys_ids.shape[1]:]
    return h.numpy(), mask.numpy(), (torch.cumsum(mask, 1) - 1).numpy()


def test_text_encoder_matches_transformers(model_dir):
    prompts = ["a red cat sleeping on the mat", "blue sky", "a dog a dog a dog a dog a dog a dog a dog"]
    enc = TextEncoder.from_pretrained(model_dir, max_length=10)
    ctx, mask, pos = enc(prompts)
    ref_h, ref_mask, ref_pos = _reference(model_dir, prompts, 10)
    assert ctx.shape == (3, 10, 32)
    np.testing.assert_array_equal(np.asarray(mask), ref_mask)
    np.testing.assert_array_equal(np.asarray(pos), ref_pos)
    np.testing.assert_allclose(np.asarray(ctx), ref_h, atol=2e-4, rtol=1e-3)  # padded positions included
