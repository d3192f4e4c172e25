"""The estimate bench's pieces that need no model: the gate's decision under each gain rule
on recorded figures, and the held-out styles' corruptions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from benchmarks import estimate as be


def case(**kw) -> dict:
    """A recorded case: the plain gain +5 points [+2, +8], overstated on the sources by 4."""
    c = {
        "base": "zeroshot",
        "stream": "lcd",
        "true_gain": 0.05,
        "guards_passed": True,
        "estimated_gain": 0.05,
        "estimated_gain_interval": [0.02, 0.08],
        "gain_bias_on_sources": [0.04, 0.01],
        "gain_corrected": False,
        "serving_adapted": False,
    }
    return {"n": 300, **c, **kw}


def test_each_gain_rule_decides_on_the_same_recorded_figures():
    first = case()  # a first adaptation: the plain gain decides under auto
    assert be.decide(first, "none") and be.decide(first, "auto")
    assert not be.decide(first, "sources")  # +1 [−2, +4]: not clearly above zero
    again = case(serving_adapted=True)  # a re-adaptation: auto corrects
    assert be.decide(again, "none") and not be.decide(again, "auto")
    # recorded by a gate that had corrected: the plain figures are recovered first
    corrected = case(estimated_gain=0.01, estimated_gain_interval=[-0.02, 0.04],
                     gain_corrected=True)  # fmt: skip
    assert be.decide(corrected, "none") and be.decide(corrected, "auto")
    assert not be.decide(corrected, "sources")
    # failed guards or no gain figure: rejected under every rule
    for bad in (case(guards_passed=False), case(estimated_gain=None)):
        assert not any(be.decide(bad, r) for r in ("none", "sources", "auto"))
    # a case recorded before the rule: adapted unless its base is zero-shot
    old = {k: v for k, v in case().items() if k not in ("serving_adapted", "gain_corrected")}
    assert be.decide(old, "auto") and not be.decide({**old, "base": "mp2a-t"}, "auto")


def test_the_summary_counts_every_rule_against_the_truth():
    cases = [case(), case(serving_adapted=True, true_gain=-0.03),
             case(stream="noise", true_gain=None, guards_passed=False)]  # fmt: skip
    for c in cases:
        c.update(true_serving=None, accepted=be.decide(c, "auto"))
    s = be._summary(cases)
    rules = s["gate_confusion_by_rule"]
    assert rules["auto"]["gain>=2_accepted"] == 1 and rules["auto"]["loss>=1_rejected"] == 1
    assert rules["none"]["loss>=1_accepted"] == 1 and rules["sources"]["gain>=2_rejected"] == 1
    assert all(r["harmful_rejected"] == 1 for r in rules.values())
    assert s["gate_confusion"] == rules["auto"]


@pytest.mark.parametrize("style", list(be.HELDOUT))
def test_a_held_out_style_changes_the_image_and_keeps_its_size(style):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    out = be.corrupt(style, img, np.random.default_rng(1))
    assert out.size == img.size and out.mode == "RGB"
    assert np.abs(np.asarray(out, np.int16) - np.asarray(img, np.int16)).mean() > 5
    again = be.corrupt(style, img, np.random.default_rng(1))
    assert np.array_equal(np.asarray(out), np.asarray(again))  # one seed, one image


def test_an_unknown_held_out_style_is_refused():
    with pytest.raises(ValueError, match="unknown held-out style 'sepia'"):
        be.corrupt("sepia", Image.new("RGB", (8, 8)), np.random.default_rng(0))
