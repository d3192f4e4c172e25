"""The quality gate on real heads and features (numpy only): it passes the serving head
against itself and rejects deliberately bad candidates with the reason named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mp2a.head import Head, l2_normalize
from online import gate

C, D = 5, 16


@pytest.fixture(scope="module")
def data() -> tuple[Head, np.ndarray, np.ndarray, np.ndarray]:
    """A head whose classes are well separated, labeled source rows and unlabeled traffic."""
    rng = np.random.default_rng(0)
    w = l2_normalize(rng.normal(size=(1, C, D))).astype(np.float32)
    head = Head(weight=w, logit_scale=30.0)

    def sample(n: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % C
        x = l2_normalize(w[0, y] + noise * rng.normal(size=(n, D))).astype(np.float32)
        return x, y

    src_x, src_y = sample(200, 0.2)
    traffic, _ = sample(150, 0.3)
    return head, src_x, src_y, traffic


def test_holdout_mask_is_every_fifth_row():
    m = gate.holdout_mask(12)
    assert m.tolist() == [i % 5 == 0 for i in range(12)]


def test_the_serving_head_passes_against_itself(data):
    head, x, y, t = data
    r = gate.evaluate(head, head, x, y, t)
    assert r["accepted"] and r["reasons"] == []
    assert r["agreement"] == 1.0 and r["source_accuracy_drop"] == 0.0
    assert r["source_accuracy_serving"] > 0.9
    json.dumps(r)  # every figure is JSON-ready


def test_a_head_with_shuffled_class_rows_is_rejected(data):
    head, x, y, t = data
    bad = Head(weight=head.weight[:, np.roll(np.arange(C), 1)], logit_scale=head.logit_scale)
    r = gate.evaluate(head, bad, x, y, t)
    assert not r["accepted"]
    assert r["source_accuracy_candidate"] < 0.1 and r["agreement"] < 0.1
    assert any("source accuracy" in s for s in r["reasons"])
    assert any("agreement" in s for s in r["reasons"])


def test_a_head_predicting_one_class_is_rejected(data):
    head, x, y, t = data
    w = np.repeat(l2_normalize(t.mean(0))[None, None], C, axis=1).astype(np.float32)
    w[:, 1:] *= -1  # class 0 points at the mean of the traffic, every other row away from it
    r = gate.evaluate(head, Head(weight=w, logit_scale=head.logit_scale), x, y, t)
    assert not r["accepted"]
    assert r["max_class_share_candidate"] >= 0.8 and r["max_class_candidate"] == 0
    assert any("class 0 takes" in s for s in r["reasons"])


def test_a_small_source_loss_within_the_margin_passes_and_a_flat_head_fails_on_entropy(data):
    head, x, y, t = data
    cooler = Head(weight=head.weight, logit_scale=head.logit_scale * 0.9)
    assert gate.evaluate(head, cooler, x, y, t)["accepted"]
    flat = Head(weight=head.weight, logit_scale=1.0)  # near-uniform probabilities
    r = gate.evaluate(head, flat, x, y, t)
    assert not r["accepted"] and r["entropy_candidate"] > 0.9
    assert any("entropy" in s for s in r["reasons"])


def test_an_unbalanced_serving_head_does_not_block_an_equally_unbalanced_candidate(data):
    head, x, y, _ = data
    t = np.repeat(x[y == 2][:1], 40, axis=0)  # traffic of a single class
    r = gate.evaluate(head, head, x, y, t)
    assert r["max_class_share_serving"] == 1.0 and r["accepted"]


def test_a_head_of_another_shape_or_no_traffic_is_rejected(data):
    head, x, y, t = data
    other = Head(weight=head.weight[:, :3], logit_scale=head.logit_scale)
    assert not gate.evaluate(head, other, x, y, t)["accepted"]
    r = gate.evaluate(head, head, x, y, t[:0])
    assert not r["accepted"] and "traffic checks cannot run" in r["reasons"][0]
