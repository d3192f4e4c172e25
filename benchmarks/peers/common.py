"""What a user of a serving framework writes around the same ONNX encoder and head.

Plain Pillow decoding at full size (`Image.open(...).convert("RGB")`), the shorter side
resized with bicubic filtering, a centre crop, per-channel normalisation, the ONNX Runtime
session with its default options, and a numpy head. Imports nothing from mp2a: these files
run in the peers' own virtual environment. MP2A_PEER_MODEL names the JSON written by
`benchmarks/peers.py` (encoder path, head file, logit scale, classes, input size, mean, std).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import onnxruntime as ort
from PIL import Image


class Model:
    def __init__(self) -> None:
        with open(os.environ["MP2A_PEER_MODEL"]) as f:
            cfg = json.load(f)
        self.session = ort.InferenceSession(cfg["onnx"], providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.head = np.load(cfg["head"])  # (C, D), rows normalised
        self.scale = float(cfg["logit_scale"])
        self.classes = cfg["classes"]
        self.size = int(cfg["image_size"])
        self.mean = np.asarray(cfg["mean"], np.float32)
        self.std = np.asarray(cfg["std"], np.float32)

    def preprocess(self, data: bytes) -> np.ndarray:
        return self.preprocess_image(Image.open(io.BytesIO(data)))

    def preprocess_image(self, im: Image.Image) -> np.ndarray:
        im = im.convert("RGB")
        s = self.size
        w, h = im.size
        nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = round((nw - s) / 2), round((nh - s) / 2)
        im = im.crop((left, top, left + s, top + s))
        x = (np.asarray(im, np.float32) / 255.0 - self.mean) / self.std  # (S, S, 3)
        return x.transpose(2, 0, 1)  # (3, S, S)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) -> class probabilities (B, C)."""
        emb = self.session.run(None, {self.input: x.astype(np.float32)})[0]  # (B, D)
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        logits = self.scale * emb @ self.head.T  # (B, C)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def answer(self, p: np.ndarray, k: int = 5) -> dict:
        top = np.argsort(-p)[:k]
        return {
            "label": self.classes[int(top[0])],
            "score": float(p[top[0]]),
            "top_k": [{"label": self.classes[int(i)], "score": float(p[i])} for i in top],
        }
