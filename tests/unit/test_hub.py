"""The hub's token model and upload checks (online/hub.py), and the edge's back-off."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from online.edge import MAX_BACKOFF_S, Backoff, EdgeConfig
from online.hub import EdgeTokens, UploadError, encode_samples, parse_upload

D, C = 8, 10
A = "a" * 32
B = "b" * 32


def test_tokens_are_scoped_to_one_site_and_checked_whole():
    t = EdgeTokens.parse(f"store-1={A}, store-2={B}")
    assert t.sites == ["store-1", "store-2"]
    assert t.site_of(f"Bearer {A}") == "store-1" and t.site_of(f"bearer {B}") == "store-2"
    for bad in ("", A, f"Basic {A}", f"Bearer {A[:-1]}", f"Bearer {A}x", "Bearer "):
        assert t.site_of(bad) is None, bad
    for raw, says in [
        (f"store-1={A},store-1={B}", "twice"),
        (f"store-1={A},store-2={A}", "share a token"),
        ("store-1=short", "shorter than 16"),
        (f"Store 1={A}", "site 'Store 1'"),
        ("store-1", "write site=token"),
    ]:
        with pytest.raises(ValueError, match=says):
            EdgeTokens.parse(raw)
    assert EdgeTokens.from_env({}) is None


def batch(n: int = 3, **over) -> dict:
    x = np.random.default_rng(0).normal(size=(n, D)).astype(np.float32)
    samples = encode_samples(x, [1] * n, [0.5] * n, ["1"] * n, [1000.0] * n)
    for k, v in over.items():
        samples[0][k] = v
    return {"batch_id": "b1", "samples": samples}


def test_a_good_upload_round_trips():
    up = parse_upload(batch(4), D, C)
    assert up.batch_id == "b1" and up.embeddings.shape == (4, D)
    assert up.labels.tolist() == [1] * 4 and up.versions == ["1"] * 4
    x = np.random.default_rng(0).normal(size=(4, D)).astype(np.float32)
    np.testing.assert_array_equal(up.embeddings, x)


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ([], 400, "JSON object"),
        ({"samples": []}, 400, "batch_id"),
        ({"batch_id": "x", "samples": []}, 400, "non-empty"),
        ({**batch(), "extra": 1}, 400, "unknown field"),
        (batch(embedding="***"), 400, "not base64"),
        (batch(embedding=base64.b64encode(b"\0" * 12).decode()), 422, "holds 3 values"),
        (batch(label=10), 422, "label must be a class index in 0..9"),
        (batch(label=True), 422, "label"),
        (batch(confidence=1.5), 422, "confidence"),
        (batch(version=""), 422, "version"),
        (batch(t="now"), 422, "unix seconds"),
    ],
)
def test_malformed_uploads_are_refused_with_the_reason(body, status, says):
    with pytest.raises(UploadError, match=says) as e:
        parse_upload(body, D, C)
    assert e.value.status == status


def test_nan_embeddings_and_oversize_batches_are_refused():
    nan = np.full((1, D), np.nan, np.float32)
    body = {"batch_id": "n", "samples": encode_samples(nan, [0], [0.1], ["1"], [1.0])}
    with pytest.raises(UploadError, match="NaN") as e:
        parse_upload(body, D, C)
    assert e.value.status == 422
    big = {"batch_id": "big", "samples": [{}] * 5001}
    with pytest.raises(UploadError, match="limit is 5000") as e:
        parse_upload(big, D, C)
    assert e.value.status == 413


def test_edge_configuration_and_backoff():
    env = {"MP2A_HUB": "http://hub:3000/", "MP2A_SITE": "store-1", "MP2A_EDGE_TOKEN": A}
    cfg = EdgeConfig.from_env(env)
    assert cfg.hub == "http://hub:3000" and cfg.poll_s == 2.0
    for bad, says in [
        ({**env, "MP2A_HUB": "hub"}, "give the hub's URL"),
        ({**env, "MP2A_EDGE_TOKEN": ""}, "MP2A_EDGE_TOKEN is not set"),
        ({**env, "MP2A_SITE": "Bad Site"}, "site 'Bad Site'"),
        ({**env, "MP2A_EDGE_POLL_S": "0"}, "MP2A_EDGE_POLL_S must be in"),
    ]:
        with pytest.raises(ValueError, match=says):
            EdgeConfig.from_env(bad)
    b = Backoff()
    waits = [b.next_wait() for _ in range(10)]
    assert 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 2.0
    assert all(MAX_BACKOFF_S / 2 <= w <= MAX_BACKOFF_S for w in waits[7:])
    b.ok()
    assert b.next_wait() <= 1.0
