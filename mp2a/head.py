"""The classification head of an adapted model: K rows of class vectors, mixed.

An adapted model is the frozen image encoder plus this head. Row k is a (C, D) matrix W_k
(the normalised text features of one source pair's target prompts, or visual prototypes:
refined class means of the target's own embeddings) with its own logit scale s_k, an
optional per-class bias b_k and a mixing weight a_k (the weights sum to 1):

    p(c | f) = sum_k a_k * softmax_c(s_k * f . W_k[c] + b_k[c])       f: normalised embedding

A head written before rows had their own scale, bias and weight (head.safetensors holding
only `weight` and `logit_scale`) loads unchanged: every row at the one scale, no bias,
equal weights (the mean over the S source prompts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROMPT, PROTOTYPE = "prompt", "prototype"  # row kinds, listed in the manifest (`head_rows`)


@dataclass(frozen=True)
class Head:
    weight: np.ndarray  # (K, C, D) float32, rows L2-normalised
    logit_scale: float  # already exponentiated (CLIP's exp(logit_scale)); the default s_k
    row_scale: np.ndarray | None = None  # (K,) per-row scale; None: logit_scale for all
    row_bias: np.ndarray | None = None  # (K, C); None: no bias
    row_weight: np.ndarray | None = None  # (K,) mixing weights summing to 1; None: equal

    def __post_init__(self) -> None:
        if self.weight.ndim != 3:
            raise ValueError(f"head weight must be (K, C, D), got shape {self.weight.shape}")
        k, c, _ = self.weight.shape
        for name, shape in (("row_scale", (k,)), ("row_bias", (k, c)), ("row_weight", (k,))):
            v = getattr(self, name)
            if v is not None and np.shape(v) != shape:
                raise ValueError(f"head {name} must have shape {shape}, got {np.shape(v)}")
        if self.row_weight is not None:
            w = np.asarray(self.row_weight, np.float64)
            if (w < 0).any() or not np.isclose(w.sum(), 1.0, atol=1e-5):
                raise ValueError(f"head row weights must be >= 0 and sum to 1, got {w}")

    @property
    def num_rows(self) -> int:
        return int(self.weight.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[1])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[2])

    @property
    def is_plain(self) -> bool:
        """True when the head is an equal-weight mean of rows at one scale, without bias (the
        layout every head had before rows got their own figures)."""
        return self.row_scale is None and self.row_bias is None and self.row_weight is None

    def scales(self) -> np.ndarray:
        """(K,) float32 logit scale of every row."""
        if self.row_scale is None:
            return np.full(self.num_rows, self.logit_scale, np.float32)
        return np.asarray(self.row_scale, np.float32)

    def biases(self) -> np.ndarray:
        """(K, C) float32."""
        if self.row_bias is None:
            return np.zeros((self.num_rows, self.num_classes), np.float32)
        return np.asarray(self.row_bias, np.float32)

    def weights(self) -> np.ndarray:
        """(K,) float32 mixing weights, summing to 1."""
        if self.row_weight is None:
            return np.full(self.num_rows, 1.0 / self.num_rows, np.float32)
        return np.asarray(self.row_weight, np.float32)

    def row_probs(self, features: np.ndarray) -> np.ndarray:
        """Normalised image features (B, D) -> per-row class probabilities (K, B, C)."""
        f = features.astype(np.float32, copy=False)
        logits = np.einsum("bd,kcd->kbc", f, self.weight)  # (K, B, C)
        logits = logits * self.scales()[:, None, None] + self.biases()[:, None, :]
        logits -= logits.max(axis=-1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=-1, keepdims=True)
        return p

    def probs(self, features: np.ndarray) -> np.ndarray:
        """Normalised image features (B, D) -> class probabilities (B, C)."""
        return np.einsum("k,kbc->bc", self.weights(), self.row_probs(features))

    def rows(self, idx: list[int]) -> Head:
        """The head made of rows `idx` alone, their mixing weights renormalised."""
        if not idx:
            raise ValueError("a head needs at least one row")
        w = self.weights()[idx]
        return Head(
            weight=self.weight[idx],
            logit_scale=self.logit_scale,
            row_scale=None if self.row_scale is None else self.scales()[idx],
            row_bias=None if self.row_bias is None else self.biases()[idx],
            row_weight=None if self.row_weight is None else w / max(float(w.sum()), 1e-12),
        )

    def tensors(self) -> dict[str, np.ndarray]:
        """What head.safetensors holds; the per-row figures only where they are not plain."""
        out = {
            "weight": np.ascontiguousarray(self.weight, np.float32),
            "logit_scale": np.asarray([self.logit_scale], np.float32),
        }
        for name in ("row_scale", "row_bias", "row_weight"):
            v = getattr(self, name)
            if v is not None:
                out[name] = np.ascontiguousarray(v, np.float32)
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray]) -> Head:
        """The inverse of `tensors` (old heads have only weight and logit_scale)."""
        return cls(
            weight=np.asarray(t["weight"], np.float32),
            logit_scale=float(np.asarray(t["logit_scale"]).reshape(-1)[0]),
            row_scale=t.get("row_scale"),
            row_bias=t.get("row_bias"),
            row_weight=t.get("row_weight"),
        )


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)
