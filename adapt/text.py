"""CLIP's text tower over token *embeddings* (CoOp), and hand-prompt class features.

The prompt learner builds sequences of embeddings (learned context + frozen token embeddings)
and needs the rest of the text tower unchanged; `PromptTextEncoder` is exactly that rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapt.models import LoadedModel


def pool_index(tokens: torch.Tensor, pool_type: str, eos_id: int | None = None) -> torch.Tensor:
    """Position whose output becomes the text feature, as open_clip's text_global_pool does."""
    if pool_type == "argmax":  # end-of-text has the highest id in CLIP's vocabulary
        return tokens.argmax(dim=-1)
    if pool_type == "eos" and eos_id is not None:
        return (tokens == eos_id).int().argmax(dim=-1)
    if pool_type == "last":
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long)
    raise ValueError(f"text pool type {pool_type!r} is not supported; use argmax, eos or last")


class PromptTextEncoder(nn.Module):
    """Frozen text tower applied to embeddings (N, L, W) with pooling positions (N,)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.positional_embedding = clip.positional_embedding
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)

    def forward(self, x: torch.Tensor, pool_at: torch.Tensor) -> torch.Tensor:
        # The text tower is causal, so positions after the last pooled token cannot change the
        # result: cut the sequences there (13 of 77 tokens for a typical prompt).
        n = int(pool_at.max()) + 1
        x = x[:, :n] + self.positional_embedding[:n]  # (N, n, W)
        mask = None if self.attn_mask is None else self.attn_mask[:n, :n]
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0]), pool_at]  # (N, W)
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection  # (N, D)


def text_pool_positions(lm: LoadedModel, tokens: torch.Tensor) -> torch.Tensor:
    clip = lm.model
    return pool_index(tokens, clip.text_pool_type, getattr(clip, "text_eos_id", None))


@torch.no_grad()
def class_text_features(lm: LoadedModel, classes: list[str], template: str) -> torch.Tensor:
    """Normalised text features (C, D) of the hand prompt `template` for each class."""
    if "{}" not in template:
        raise ValueError(f"prompt template {template!r} needs a '{{}}' where the class name goes")
    tokens = lm.tokenizer([template.format(c) for c in classes])
    return F.normalize(lm.model.encode_text(tokens), dim=-1)
