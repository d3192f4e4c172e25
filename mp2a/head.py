"""The classification head of an adapted model: S stacked text-feature matrices + logit scale.

An adapted model is the frozen image encoder plus this head. With S source prompts the class
probabilities are the mean over s of softmax(scale * f @ W_s^T), f the normalised embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Head:
    weight: np.ndarray  # (S, C, D) float32, rows L2-normalised
    logit_scale: float  # already exponentiated (CLIP's exp(logit_scale))

    def __post_init__(self) -> None:
        if self.weight.ndim != 3:
            raise ValueError(f"head weight must be (S, C, D), got shape {self.weight.shape}")

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[1])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[2])

    def probs(self, features: np.ndarray) -> np.ndarray:
        """Normalised image features (B, D) -> class probabilities (B, C)."""
        f = features.astype(np.float32, copy=False)
        logits = self.logit_scale * np.einsum("bd,scd->sbc", f, self.weight)  # (S, B, C)
        logits -= logits.max(axis=-1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=-1, keepdims=True)
        return p.mean(axis=0)  # (B, C)


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)
