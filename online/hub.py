"""The hub side of edge adaptation: site tokens, traffic uploads, per-site heads.

A hub is a `mp2a serve` with MP2A_ONLINE=1 and MP2A_EDGE_TOKENS=site=token,site2=token2 (any
state backend). Each edge site is its own target domain with its own version line in the
state (version 1 = the base artifact): the worker adapts a site on that site's traffic only,
and a rollback of one site leaves the others alone.

- Tokens (`EdgeTokens`): one per site, distinct from the admin token, compared in constant
  time. A token names its site: it can neither upload as another site nor read another
  site's head.
- `POST /traffic` (`parse_upload`): a JSON batch `{"batch_id", "samples": [{"embedding":
  base64 of D little-endian float32, "label", "confidence", "version", "t"}]}` for the
  token's site. Checked whole before anything is stored: the body size, the number of
  samples, the embedding width, finite values, a label of the label set, a confidence in
  [0, 1]. The batch id makes a retry harmless: a batch already received is refused (409)
  and nothing is stored twice; the edge treats that answer as delivered.
- `GET /sites/{site}/model` (`site_head`): the site's current head as safetensors bytes
  (base64), its version, parent, head rows and sha256, with an ETag; If-None-Match answers
  304, so polling costs a few bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import save as save_tensors_bytes

from mp2a.artifact import Artifact
from mp2a.errors import Mp2aError

SITE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MAX_UPLOAD_BYTES = 8 * 2**20
MAX_UPLOAD_SAMPLES = 5000


class UploadError(Mp2aError):
    """A refused upload: `status` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_site(site: str) -> str:
    if not isinstance(site, str) or not SITE_RE.match(site):
        raise ValueError(
            f"site {site!r}: use 1-63 lowercase letters, digits, '-' or '_', starting with a "
            "letter or digit"
        )
    return site


@dataclass(frozen=True)
class EdgeTokens:
    """site -> token, from MP2A_EDGE_TOKENS=site=token,site2=token2."""

    tokens: dict[str, str]

    @classmethod
    def parse(cls, raw: str) -> EdgeTokens:
        tokens: dict[str, str] = {}
        for part in (p.strip() for p in raw.split(",")):
            if not part:
                continue
            site, sep, token = part.partition("=")
            if not sep or not token.strip():
                raise ValueError(f"MP2A_EDGE_TOKENS entry {part!r}: write site=token")
            check_site(site.strip())
            if site.strip() in tokens:
                raise ValueError(f"MP2A_EDGE_TOKENS names site {site.strip()!r} twice")
            if len(token.strip()) < 16:
                raise ValueError(
                    f"MP2A_EDGE_TOKENS: the token of site {site.strip()!r} is shorter than 16 "
                    "characters; use a random one (openssl rand -hex 16)"
                )
            tokens[site.strip()] = token.strip()
        if len(set(tokens.values())) != len(tokens):
            raise ValueError("MP2A_EDGE_TOKENS: two sites share a token; give each its own")
        return cls(tokens)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> EdgeTokens | None:
        raw = env.get("MP2A_EDGE_TOKENS", "").strip()
        return cls.parse(raw) if raw else None

    @property
    def sites(self) -> list[str]:
        return sorted(self.tokens)

    def site_of(self, authorization: str) -> str | None:
        """The site whose token `authorization` ("Bearer <token>") carries, else None. Every
        token is compared (in constant time), so the answer time does not say which matched."""
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        given_b = given.strip().encode()
        found = None
        for site, token in self.tokens.items():
            if hmac.compare_digest(given_b, token.encode()):
                found = site
        return found


@dataclass(frozen=True)
class Upload:
    batch_id: str
    embeddings: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64
    confidences: np.ndarray  # (N,) float32
    versions: list[str]
    times: np.ndarray  # (N,) float64


def parse_upload(body: object, dim: int, classes: int) -> Upload:
    """Check a POST /traffic body whole; UploadError (400/413/422) says what is wrong."""
    if not isinstance(body, dict):
        raise UploadError(400, 'the body must be a JSON object {"batch_id", "samples": [...]}')
    unknown = sorted(set(body) - {"batch_id", "samples", "site"})
    if unknown:
        raise UploadError(400, f"unknown field(s) {', '.join(unknown)}")
    batch_id = body.get("batch_id")
    if not isinstance(batch_id, str) or not 1 <= len(batch_id) <= 200:
        raise UploadError(400, "batch_id must be a string of 1 to 200 characters")
    samples = body.get("samples")
    if not isinstance(samples, list) or not samples:
        raise UploadError(400, "samples must be a non-empty list")
    if len(samples) > MAX_UPLOAD_SAMPLES:
        raise UploadError(
            413, f"{len(samples)} samples in one batch; the limit is {MAX_UPLOAD_SAMPLES}"
        )
    emb = np.empty((len(samples), dim), np.float32)
    labels = np.empty(len(samples), np.int64)
    conf = np.empty(len(samples), np.float32)
    times = np.empty(len(samples), np.float64)
    versions = []
    for i, s in enumerate(samples):
        where = f"samples[{i}]"
        if not isinstance(s, dict):
            raise UploadError(400, f"{where} must be an object")
        try:
            raw = base64.b64decode(s.get("embedding", ""), validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise UploadError(400, f"{where}.embedding is not base64") from None
        if len(raw) != 4 * dim:
            raise UploadError(
                422,
                f"{where}.embedding holds {len(raw) // 4} values; this model's embeddings have "
                f"{dim} (float32, little-endian)",
            )
        emb[i] = np.frombuffer(raw, dtype="<f4")
        label, c, t, v = s.get("label"), s.get("confidence"), s.get("t"), s.get("version")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < classes:
            raise UploadError(422, f"{where}.label must be a class index in 0..{classes - 1}")
        if isinstance(c, bool) or not isinstance(c, int | float) or not 0.0 <= c <= 1.0:
            raise UploadError(422, f"{where}.confidence must be a number in [0, 1]")
        if isinstance(t, bool) or not isinstance(t, int | float) or not np.isfinite(t):
            raise UploadError(422, f"{where}.t must be unix seconds")
        if not isinstance(v, str) or not 1 <= len(v) <= 64:
            raise UploadError(422, f"{where}.version must be the served version, a string")
        labels[i], conf[i], times[i] = label, c, t
        versions.append(v)
    if not np.isfinite(emb).all():
        bad = int((~np.isfinite(emb)).any(1).sum())
        raise UploadError(422, f"{bad} embedding(s) hold NaN or infinite values; nothing stored")
    return Upload(batch_id, emb, labels, conf, versions, times)


def encode_samples(embeddings: np.ndarray, labels, confidences, versions, times) -> list[dict]:
    """The edge side of the upload format (the inverse of `parse_upload`)."""
    return [
        {
            "embedding": base64.b64encode(np.ascontiguousarray(e, "<f4").tobytes()).decode(),
            "label": int(lab),
            "confidence": float(c),
            "version": str(v),
            "t": float(t),
        }
        for e, lab, c, v, t in zip(embeddings, labels, confidences, versions, times, strict=True)
    ]


def head_bytes(art: Artifact) -> bytes:
    """The served head as safetensors bytes (what the edge installs)."""
    return save_tensors_bytes(art.head.tensors())


def site_head(art: Artifact, site: str) -> tuple[dict, str]:
    """GET /sites/{site}/model's body and ETag."""
    data = head_bytes(art)
    sha = hashlib.sha256(data).hexdigest()
    etag = f'"{art.version}-{sha[:32]}"'
    body = {
        "site": site,
        "version": art.version,
        "parent_version": art.manifest.get("parent_version"),
        "created_at": art.manifest.get("created_at"),
        "method": art.manifest.get("method"),
        "head_rows": art.manifest.get("head_rows"),
        "sha256": sha,
        "head": base64.b64encode(data).decode(),
    }
    return body, etag
