import pytest
import torch

from adapt.models import load_model
from adapt.text import PromptTextEncoder, class_text_features, text_pool_positions


@pytest.mark.parametrize("which", ["micro", "tiny-digits"])
def test_prompt_text_encoder_reproduces_encode_text(which, micro_model_dir):
    lm = load_model(str(micro_model_dir) if which == "micro" else "tiny-digits")
    tokens = lm.tokenizer(["a photo of a seven.", "the number 3", "x"])
    emb = lm.model.token_embedding(tokens)  # (N, L, W): what a prompt learner would build
    enc = PromptTextEncoder(lm.model)
    with torch.no_grad():
        got = enc(emb, text_pool_positions(lm, tokens))
        want = lm.model.encode_text(tokens)
    assert got.shape == want.shape
    # the encoder stops at the last pooled token (the tower is causal): same maths, float32
    # sums of other lengths, so equal up to rounding (features are of order 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_prompt_text_encoder_is_sensitive_to_context(micro_model_dir):
    """Changing a context embedding changes the feature: the encoder really reads embeddings."""
    lm = load_model(str(micro_model_dir))
    tokens = lm.tokenizer(["a photo of a seven."])
    emb = lm.model.token_embedding(tokens)
    enc = PromptTextEncoder(lm.model)
    pos = text_pool_positions(lm, tokens)
    with torch.no_grad():
        a = enc(emb, pos)
        emb2 = emb.clone()
        emb2[0, 1] += 1.0
        b = enc(emb2, pos)
    assert not torch.allclose(a, b)


def test_class_text_features_needs_placeholder(micro_model_dir):
    lm = load_model(str(micro_model_dir))
    with pytest.raises(ValueError, match="needs a"):
        class_text_features(lm, ["zero"], "no placeholder")
    f = class_text_features(lm, ["zero", "one"], "a photo of the number {}.")
    assert f.shape == (2, 32)
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(2))
