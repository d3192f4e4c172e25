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
    # what a site gets: the true gain where the rule accepts, the harmful stream left out
    served = s["served_change_by_rule"]
    assert served["none"] == {"runs": 2, "accepted": 2, "mean_change": pytest.approx(0.01)}
    assert served["auto"] == {"runs": 2, "accepted": 1, "mean_change": pytest.approx(0.025)}
    assert served["sources"]["accepted"] == 0 and served["sources"]["mean_change"] == 0
    assert served["recorded"] == served["auto"]


def test_draws_are_disjoint_and_leave_unseen_samples():
    assert be.slice_starts(300, 5000, 6) == [0, 300, 600, 900, 1200, 1500]
    assert be.slice_starts(1000, 5000, 6) == [0, 1000, 2000, 3000]  # each leaves >= 1,000
    assert be.slice_starts(1000, 4000, 6) == [0, 1000, 2000]
    assert be.slice_starts(5000, 5000, 6) == [0]  # the first draw always
    assert be.slice_starts(300, 5000, 1) == [0]


def test_the_mixed_stream_is_compared_draw_by_draw_and_over_every_draw():
    cases = [case(slice=0, true_gain=0.10), case(slice=1, true_gain=0.02),
             case(stream="mixed", slice=0, true_gain=0.04),
             case(stream="mixed", slice=1, true_gain=0.05)]  # fmt: skip
    for c in cases:
        c.update(true_serving=None, accepted=True)
    s = be._summary(cases)
    # draw by draw only where the clean draw gained >= 2 points
    assert [(m["slice"], m["ratio"]) for m in s["mixed_vs_clean"]] == [(0, 0.4), (1, 2.5)]
    (mean,) = s["mixed_vs_clean_mean"]
    assert mean["draws"] == 2 and mean["accepted"] == 2
    assert mean["mean_gain"] == pytest.approx(0.045) and mean["ratio"] == pytest.approx(0.75)


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
