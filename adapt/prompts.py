"""Multi-prompt learner: one prompt pair (source, target) per source domain.

For source domain s and class c the two prompts are

    [SOS] [domain context: source_s or target_s (M2)] [class context c of pair s (M1)] name . [EOS]

The class context is shared by the source and the target prompt of the pair; the domain
context blocks tell the two apart. The domain context starts from the word embeddings of the
hand prompt's prefix ("a photo of the number"), the class context from small noise. Only
these contexts train; the text tower stays frozen and runs over embeddings.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapt.models import LoadedModel
from adapt.text import PromptTextEncoder, text_pool_positions
from mp2a.errors import DataError

SOURCE, TARGET = 0, 1


def _prefix_embedding(lm: LoadedModel, prefix: str) -> torch.Tensor:
    """Embeddings (n, W) of the words of `prefix` (no SOS/EOS)."""
    tokens = lm.tokenizer([prefix])[0]
    n = int(text_pool_positions(lm, tokens[None])[0]) - 1  # words between SOS and EOS
    with torch.no_grad():
        return lm.model.token_embedding(tokens[1 : 1 + n]).clone()


class MultiPromptLearner(nn.Module):
    def __init__(
        self,
        lm: LoadedModel,
        classes: list[str],
        num_sources: int,
        template: str,
        n_class_ctx: int = 4,
        n_domain_ctx: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if "{}" not in template:
            raise DataError(f"prompt template {template!r} needs a '{{}}' for the class name")
        head, tail = template.split("{}", 1)
        width = lm.model.token_embedding.weight.shape[1]
        gen = torch.Generator().manual_seed(seed)
        init = _prefix_embedding(lm, head.strip()) if head.strip() else torch.empty(0, width)
        m2 = n_domain_ctx if n_domain_ctx is not None else max(len(init), 1)
        if len(init) != m2:  # no usable prefix of that length: start from noise
            init = torch.randn(m2, width, generator=gen) * 0.02
        self.num_sources, self.num_classes = num_sources, len(classes)
        self.n_class_ctx, self.n_domain_ctx = n_class_ctx, m2
        self.template = template

        self.domain_ctx = nn.Parameter(init.repeat(num_sources, 2, 1, 1))  # (S, 2, M2, W)
        self.class_ctx = nn.Parameter(
            torch.randn(num_sources, len(classes), n_class_ctx, width, generator=gen) * 0.02
        )  # (S, C, M1, W)

        n_ctx = m2 + n_class_ctx
        texts = [" ".join(["X"] * n_ctx) + " " + name + tail.rstrip() for name in classes]
        tokens = lm.tokenizer(texts)  # (C, L)
        pool_at = text_pool_positions(lm, tokens)
        if int(pool_at.min()) <= n_ctx + 1 or bool((tokens[:, -1] != 0).any()):
            raise DataError(
                f"prompts with {n_ctx} context tokens do not fit the text tower's "
                f"{tokens.shape[1]} tokens; use shorter class names or fewer context tokens"
            )
        with torch.no_grad():
            emb = lm.model.token_embedding(tokens)  # (C, L, W)
        self.register_buffer("sos", emb[:, :1].clone(), persistent=False)  # (C, 1, W)
        self.register_buffer("suffix", emb[:, 1 + n_ctx :].clone(), persistent=False)
        self.register_buffer("pool_at", pool_at, persistent=False)
        self.encoder = PromptTextEncoder(lm.model)
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    def text_features(self) -> torch.Tensor:
        """Normalised features of all prompts: (S, 2, C, D), index 1 = SOURCE/TARGET."""
        s, c = self.num_sources, self.num_classes
        w = self.sos.shape[-1]
        dom = self.domain_ctx[:, :, None].expand(s, 2, c, self.n_domain_ctx, w)
        cls = self.class_ctx[:, None].expand(s, 2, c, self.n_class_ctx, w)
        sos = self.sos.expand(s, 2, c, 1, w)
        suf = self.suffix.expand(s, 2, c, self.suffix.shape[1], w)
        x = torch.cat([sos, dom, cls, suf], dim=3)  # (S, 2, C, L, W)
        x = x.reshape(s * 2 * c, -1, w)  # (S*2*C, L, W)
        f = self.encoder(x, self.pool_at.repeat(s * 2))  # (S*2*C, D)
        return F.normalize(f, dim=-1).reshape(s, 2, c, -1)

    def state(self) -> dict[str, torch.Tensor]:
        return {"domain_ctx": self.domain_ctx.detach(), "class_ctx": self.class_ctx.detach()}

    def arrays(self) -> dict[str, np.ndarray]:
        """`state` as float32 arrays: the artifact's prompts.safetensors."""
        return {k: v.numpy().astype(np.float32) for k, v in self.state().items()}

    def config(self, fit: object) -> dict:
        """The manifest's `prompt` entry: template, context sizes and the fit settings."""
        return {
            "template": self.template,
            "n_class_ctx": self.n_class_ctx,
            "n_domain_ctx": self.n_domain_ctx,
            "fit": dataclasses.asdict(fit),
        }

    def load_state(self, t: dict[str, torch.Tensor]) -> None:
        """Start from saved contexts (e.g. the serving artifact's prompts)."""
        with torch.no_grad():
            for name in ("domain_ctx", "class_ctx"):
                p = getattr(self, name)
                src = torch.as_tensor(t[name])
                if src.shape != p.shape:
                    raise DataError(
                        f"saved {name} has shape {tuple(src.shape)}, need {tuple(p.shape)}"
                    )
                p.copy_(src)
