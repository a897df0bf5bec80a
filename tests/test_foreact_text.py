"""ForeAct's caption features vs the official recipe run in transformers: chat prompt with the system prompt in the
user turn, left padding, truncation, Gemma-2 with `lm_head = Identity` (so the final soft-cap lands on the hidden
states) and no attention-logit cap (the official SDPA numerics), on a tiny random Gemma-2 and a word-level tokenizer
carrying Gemma's chat template."""

import numpy as np
import pytest

from jaxeff.foreact.text import SYSTEM_PROMPT, TextEncoder, chat_prompts, tokenize

GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<start_of_turn>user\n{{ message['content'] }}"
                  "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
CAPTIONS = ["pick up the red block and place it on the blue pad", ""]
TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, query_pre_attn_scalar=16, sliding_window=8, attn_logit_softcapping=50.0,
            final_logit_softcapping=2.0, initializer_range=0.3, max_position_embeddings=128, rms_norm_eps=1e-6)


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    pre = tokenizers.pre_tokenizers.Whitespace()
    words = {w for text in [SYSTEM_PROMPT, *CAPTIONS, "<start_of_turn> user model <end_of_turn>"]
             for w, _ in pre.pre_tokenize_str(text)}
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *sorted(words)])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = GEMMA_TEMPLATE
    return fast


def test_prompt_and_padding(tokenizer):
    prompts = chat_prompts(tokenizer, CAPTIONS)
    assert prompts[1] == f"<bos><start_of_turn>user\n{SYSTEM_PROMPT}\n<end_of_turn>\n<start_of_turn>model\n"
    ids, mask = tokenize(tokenizer, CAPTIONS)
    assert mask[0].all() and not mask[1, 0] and mask[1, -1]  # left padding
    assert (ids[1][mask[1] == 0] == tokenizer.pad_token_id).all()
    assert tokenizer.padding_side == "right"  # restored
    ids, mask = tokenize(tokenizer, CAPTIONS, max_tokens=10)
    assert ids.shape == (2, 10)


def test_features_vs_transformers(tokenizer):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxeff.io import hf
    from jaxeff.models.gemma2 import Gemma2Config

    torch.manual_seed(0)
    cfg = dict(TINY, vocab_size=len(tokenizer))
    # transformers 4.57's SDPA path (the official one) skips the attention-logit cap; 5.x refuses SDPA for Gemma-2,
    # so the reference is the eager path with that cap off
    cfg["attn_logit_softcapping"] = None
    ref = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**cfg, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
    ref.lm_head = torch.nn.Identity()  # as VisualForesight does
    tokenizer.padding_side = "left"
    enc = tokenizer(text=chat_prompts(tokenizer, CAPTIONS), return_tensors="pt", padding=True, truncation=True,
                    max_length=256)
    tokenizer.padding_side = "right"
    with torch.no_grad():
        want = ref(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.numpy()
    jcfg = Gemma2Config.from_hf(dict(cfg, model_type="gemma2"))
    encoder = TextEncoder(tokenizer, hf.from_state_dict(jcfg, tensors))
    feats, mask = encoder(CAPTIONS)
    np.testing.assert_array_equal(mask, enc["attention_mask"].numpy())
    real = enc["attention_mask"].numpy().astype(bool)
    assert np.abs(want[real]).max() <= 2.0  # the final soft-cap (2.0 here) is on the features
    np.testing.assert_allclose(np.asarray(feats)[real], want[real], rtol=0, atol=2e-5)
    assert np.isfinite(np.asarray(feats)).all()
