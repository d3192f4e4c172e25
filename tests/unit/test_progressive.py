import itertools

import numpy as np
import pytest
import torch

from adapt.models import load_model
from adapt.progressive import (
    FitConfig,
    fit,
    ratio_at,
    select_class_balanced,
    select_threshold,
)
from adapt.prompts import MultiPromptLearner


def test_ratio_schedules():
    for kind in ("linear", "cosine", "exp"):
        rs = [ratio_at(t, 5, 0.2, kind) for t in range(1, 6)]
        assert rs[0] == pytest.approx(0.2) and rs[-1] == pytest.approx(1.0)
        assert all(a < b for a, b in itertools.pairwise(rs)), (kind, rs)
    assert [ratio_at(t, 5, 0.2) for t in range(1, 6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert ratio_at(1, 1, 0.3) == 1.0
    with pytest.raises(ValueError):
        ratio_at(0, 5, 0.2)
    with pytest.raises(ValueError):
        ratio_at(1, 5, 0.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        ratio_at(1, 5, 0.2, "zigzag")


def test_class_balanced_selection_takes_top_per_class():
    # class 0: 4 samples, class 1: 2 samples, class 2: none
    probs = np.array(
        [
            [0.9, 0.1, 0.0],
            [0.6, 0.4, 0.0],
            [0.8, 0.1, 0.1],
            [0.7, 0.2, 0.1],
            [0.1, 0.85, 0.05],
            [0.3, 0.6, 0.1],
        ]
    )
    idx, pseudo = select_class_balanced(probs, 0.5)
    assert idx.tolist() == [0, 2, 4]  # top 2 of class 0 (0.9, 0.8), top 1 of class 1
    assert pseudo.tolist() == [0, 0, 1]
    idx, _ = select_class_balanced(probs, 1.0)
    assert idx.tolist() == list(range(6))
    # a rare class keeps at least one sample even at a small ratio
    idx, pseudo = select_class_balanced(probs, 0.01)
    assert sorted(pseudo.tolist()) == [0, 1]
    # another confidence ranks within the same pseudo-classes
    conf = np.array([0.1, 0.9, 0.2, 0.3, 0.5, 0.6])
    idx, pseudo = select_class_balanced(probs, 0.5, conf)
    assert idx.tolist() == [1, 3, 5] and pseudo.tolist() == [0, 0, 1]


def test_threshold_selection():
    probs = np.array([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8]])
    idx, pseudo = select_threshold(probs, 0.6)
    assert idx.tolist() == [0, 2] and pseudo.tolist() == [0, 1]


def _toy_problem(micro_model_dir):
    lm = load_model(str(micro_model_dir))
    rng = np.random.default_rng(0)
    d = lm.backbone.embed_dim

    def feats(n):
        f = rng.normal(size=(n, d)).astype(np.float32)
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    sources = [(feats(30), rng.integers(0, 3, 30)), (feats(30), rng.integers(0, 3, 30))]
    target = feats(24)
    init = rng.dirichlet(np.ones(3), size=24).astype(np.float32)
    return lm, sources, target, init


def test_target_labels_never_reach_training(micro_model_dir):
    """Training with true or shuffled target labels in the evaluator gives a bit-identical head."""
    lm, sources, target, init = _toy_problem(micro_model_dir)
    labels = np.random.default_rng(1).integers(0, 3, len(target))
    cfg = FitConfig(stages=3, steps_per_stage=4, batch_size=8)
    heads, rows = [], []
    for lab in (labels, np.random.default_rng(2).permutation(labels)):
        learner = MultiPromptLearner(lm, ["zero", "one", "two"], 2, "a photo of the number {}.")

        def evaluate(idx, pseudo, probs, lab=lab):
            return {"accuracy": float((probs.argmax(1) == lab).mean())}

        r = fit(learner, sources, target, init, 10.0, cfg, "mp2a", evaluate, progress=False)
        heads.append(r.head_weight)
        rows.append(r.per_stage)
    np.testing.assert_array_equal(heads[0], heads[1])
    assert [r["selected"] for r in rows[0]] == [r["selected"] for r in rows[1]]


def test_fit_modes_and_stage_log(micro_model_dir):
    lm, sources, target, init = _toy_problem(micro_model_dir)
    cfg = FitConfig(stages=3, r0=0.25, steps_per_stage=3, batch_size=8)
    classes = ["zero", "one", "two"]
    learner = MultiPromptLearner(lm, classes, 2, "a photo of the number {}.")
    before = learner.state()["class_ctx"].clone()
    r = fit(learner, sources, target, init, 10.0, cfg, "mp2a", progress=False)
    assert not torch.equal(before, learner.state()["class_ctx"])  # the prompts trained
    assert [row["stage"] for row in r.per_stage] == [1, 2, 3]
    sel = [row["selected"] for row in r.per_stage]
    assert sel[0] < sel[1] < sel[2] == len(target)
    assert set(r.per_stage[0]) >= {"selected", "ratio", "loss", "seconds"}
    assert r.head_weight.shape == (2, 3, lm.backbone.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(r.head_weight, axis=-1), 1.0, atol=1e-5)

    one = fit(
        MultiPromptLearner(lm, classes, 2, "a {}."),
        sources,
        target,
        init,
        10.0,
        FitConfig(stages=3, steps_per_stage=2, oneshot_threshold=0.5, batch_size=8),
        "oneshot",
        progress=False,
    )
    assert len(one.per_stage) == 1
    assert one.per_stage[0]["selected"] == int((init.max(1) >= 0.5).sum())
    so = fit(
        MultiPromptLearner(lm, classes, 2, "a {}."),
        sources,
        target,
        init,
        10.0,
        FitConfig(stages=2, steps_per_stage=2, batch_size=8),
        "source-only",
        progress=False,
    )
    assert so.per_stage[0]["selected"] == 0
    assert r.refinement is None and one.refinement is None


@pytest.mark.parametrize("stage_refine", [False, True])
def test_mp2a_t_runs_the_stages_and_returns_the_final_refinement(micro_model_dir, stage_refine):
    lm, sources, target, init = _toy_problem(micro_model_dir)
    cfg = FitConfig(stages=2, steps_per_stage=3, batch_size=8, stage_refine=stage_refine)
    learner = MultiPromptLearner(lm, ["zero", "one", "two"], 2, "a photo of the number {}.")
    r = fit(learner, sources, target, init, 10.0, cfg, "mp2a-t", progress=False)
    assert [row["stage"] for row in r.per_stage] == [1, 2]
    assert r.refinement is not None and r.refinement.probs.shape == (len(target), 3)
    if not stage_refine:  # the same stages as mp2a: the same prompts, bit for bit
        plain = MultiPromptLearner(lm, ["zero", "one", "two"], 2, "a photo of the number {}.")
        p = fit(plain, sources, target, init, 10.0, cfg, "mp2a", progress=False)
        np.testing.assert_array_equal(p.head_weight, r.head_weight)


def test_learner_initial_domain_context_is_the_hand_prompt(micro_model_dir):
    lm = load_model(str(micro_model_dir))
    learner = MultiPromptLearner(lm, ["zero", "one"], 3, "a photo of the number {}.")
    assert learner.n_domain_ctx == 5  # a, photo, of, the, number
    tokens = lm.tokenizer(["a photo of the number"])[0][1:6]
    want = lm.model.token_embedding(tokens)
    for s in range(3):
        for k in range(2):
            torch.testing.assert_close(learner.domain_ctx[s, k], want)
    f = learner.text_features()
    assert f.shape == (3, 2, 2, lm.backbone.embed_dim)


def test_learner_rejects_prompts_that_do_not_fit(micro_model_dir):
    from mp2a.errors import DataError

    lm = load_model(str(micro_model_dir))  # 16-token text tower
    with pytest.raises(DataError, match="do not fit"):
        MultiPromptLearner(lm, ["a very long class name " * 3], 1, "a photo of a {}.")
