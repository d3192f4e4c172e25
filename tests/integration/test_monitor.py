"""Label-free monitoring as an operator sees it: a real `mp2a serve` answers every
prediction with an `ood_score`, GET /monitor (anonymous, in the OpenAPI document) says how
good the served head is now from the stored traffic, with null figures and a reason until
there is enough of it, and the mp2a_estimated_accuracy… gauges are in /metrics. The worker's
drift trigger starts one run when the traffic changes domain, and none while it does not."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serving_server import fresh_run, predict_ok, serve_client, server_env

from mp2a.artifact import load_artifact


def gauges(text: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith(("mp2a_estimated_accuracy", "mp2a_shift_score", "mp2a_ood")):
            for s in fam.samples:
                out.setdefault(s.name, {})[s.labels.get("site", "")] = s.value
    return out


def test_monitor_route_gauges_and_ood_scores_on_a_real_server(street_run, digits_small, tmp_path):
    run = fresh_run(street_run, tmp_path / "run")
    env = server_env(tmp_path, MP2A_MONITOR_INTERVAL_S="1", MP2A_MONITOR_MIN_SAMPLES="30")
    cmd = [sys.executable, "-m", "mp2a", "serve", str(run), "--host", "127.0.0.1"]
    files = sorted(digits_small.glob("street/*/*.png"))
    with serve_client(cmd, env, tmp_path / "serve.log") as c:
        empty = c.get("/monitor").json()
        assert empty["site"] == "" and empty["version"] == "1"
        assert empty["estimated_accuracy"] is None and empty["interval"] == [None, None]
        assert empty["reason"], empty  # says why there is no figure yet
        answers = [predict_ok(c, f) for f in files]
        for a in answers:
            assert 0.0 <= a["ood_score"] < 1.0
        deadline = time.time() + 60
        while True:
            fig = c.get("/monitor").json()
            done = fig["estimated_accuracy"] is not None and fig["n"] == len(files)
            if done or time.time() > deadline:  # every answer stored, then computed
                break
            time.sleep(0.5)
        assert fig["n"] == len(files), fig
        low, high = fig["interval"]
        assert 0.0 <= low <= fig["estimated_accuracy"] <= high <= 1.0
        assert fig["shift_score"] is not None and 0.0 <= fig["ood_fraction"] <= 1.0
        assert fig["method"] == "atc-slope" and fig["reason"] is None
        g = gauges(c.get("/metrics").text)
        assert g["mp2a_estimated_accuracy"]["default"] == pytest.approx(
            fig["estimated_accuracy"], abs=0.2
        )
        for name in ("mp2a_estimated_accuracy_low", "mp2a_estimated_accuracy_high",
                     "mp2a_shift_score", "mp2a_ood_fraction"):  # fmt: skip
            assert "default" in g[name], name
        doc = c.get("/docs.json").json()
        assert "/monitor" in doc["paths"] and "get" in doc["paths"]["/monitor"]
        r = c.get("/monitor", params={"site": "elsewhere"})
        assert r.status_code == 404 and "not a hub" in r.json()["error"]


def _embeddings(run, folder) -> np.ndarray:
    from adapt.features import encode_files
    from adapt.models import load_model

    lm = load_model(load_artifact(run).backbone.model)
    x, ok = encode_files(lm, sorted(folder.glob("*/*.png")), progress=False)
    return x[ok]


def test_drift_starts_one_run_when_the_domain_changes_and_none_before(
    street_run, digits_small, tmp_path
):
    from online import worker
    from online.state import FileState
    from online.store import StoreConfig, TrafficStore

    run = fresh_run(street_run, tmp_path / "run")
    same = _embeddings(run, digits_small / "street")  # 40 images
    other = _embeddings(run, digits_small / "handwritten")
    state = FileState(run)
    store = TrafficStore(StoreConfig(path=run / "traffic.sqlite", dim=same.shape[1]))
    rng = np.random.default_rng(0)
    cfg = worker.WorkerConfig(min_samples=20, stages=1, steps_per_stage=3)
    drift = worker.Drift(
        monitor=worker.monitor.MonitorConfig(drift_window=40),
        check_every=20,
        cooldown_s=0.0,
        adapt_after=100,
    )

    def offer(x: np.ndarray, n: int) -> None:
        # the same images again, each with a little noise: a stationary stream of one domain
        for e in x[rng.integers(0, len(x), n)]:
            store.offer(e + rng.normal(0, 0.01, e.shape).astype(np.float32), 0, 1.0, "1")
        store.flush(30)

    since, runs = 0, []
    for _ in range(10):  # 10 checks of the stationary stream
        offer(same, 20)
        if drift.due(state, "", since) is not None:
            runs.append("stationary")
    assert runs == [] and drift.change_id == {}, drift.last
    n_other, flagged_at = 0, None
    for _ in range(12):
        offer(other, 20)
        n_other += 20
        settings = drift.due(state, "", since)
        if flagged_at is None and "" in drift.change_id:
            flagged_at = n_other
        if settings is not None:  # what worker.loop does with it
            since = state.traffic_max_id("")
            cfg_run = worker.with_settings(cfg, worker.request_overrides(settings))
            status = worker.run_once(state, cfg_run, request={"trigger": "drift"})
            runs.append(status["state"])
            break
    store.close()
    assert len(runs) == 1 and runs[0] in ("accepted", "rejected"), (runs, drift.last)
    assert drift.last[""]["drifted"] and "differ" in drift.last[""]["reason"]
    # flagged early, run later: on the new traffic alone, once there was enough of it
    assert flagged_at is not None and flagged_at < n_other, (flagged_at, n_other)
    assert drift.adapt_after <= settings["max_samples"] <= n_other + 40
    assert status["n_traffic"] == settings["max_samples"]


def test_the_drift_settings_from_the_environment():
    from online import worker

    assert worker.drift_from_env({"MP2A_DRIFT": "0"}) is None
    d = worker.drift_from_env({"MP2A_DRIFT_ADAPT_AFTER": "250", "MP2A_DRIFT_COOLDOWN_S": "5"})
    assert d.adapt_after == 250 and d.cooldown_s == 5.0
    for bad in ({"MP2A_DRIFT_ADAPT_AFTER": "0"}, {"MP2A_DRIFT_ADAPT_AFTER": "many"}):
        with pytest.raises(ValueError, match="MP2A_DRIFT_ADAPT_AFTER"):
            worker.drift_from_env(bad)


def test_bad_windows_give_null_figures_with_a_reason(street_run):
    from online import monitor

    cal = monitor.calibrate(load_artifact(street_run))
    cfg = monitor.MonitorConfig(min_samples=20)
    d = cal.art.head.dim
    src = cal.source.features
    cases = {
        "empty": np.zeros((0, d), np.float32),
        "fewer than classes": src[:5],
        "NaN rows": np.full((100, d), np.nan, np.float32),
    }
    for name, x in cases.items():
        fig = monitor.compute(cal, x, cfg)
        assert fig["estimated_accuracy"] is None and fig["interval"] == [None, None], name
        assert "usable samples" in fig["reason"], (name, fig)
    # every sample out of the label set: the share is reported, the estimate is not
    w = cal.art.prompt_head().weight.mean(axis=0)  # (C, D)
    away = -w.sum(axis=0)  # pointing away from every class vector
    far = np.repeat(away[None], 60, axis=0) + np.random.default_rng(0).normal(0, 0.01, (60, d))
    fig = monitor.compute(cal, far.astype(np.float32), cfg)
    assert fig["ood_fraction"] == 1.0 and fig["estimated_accuracy"] is None
    assert "look like the label set" in fig["reason"]
    # the source rows themselves: a figure, near the source accuracy
    fig = monitor.compute(cal, src, cfg)
    acc = float((cal.source.probs.argmax(1) == cal.source.labels).mean())
    assert fig["reason"] is None and abs(fig["estimated_accuracy"] - acc) < 0.1
    assert monitor.drift(cal, src[:10], cfg)["drifted"] is False


def test_one_image_repeated_neither_fills_the_window_nor_looks_like_drift(street_run):
    """A health probe sending one image between real traffic: the monitor counts it once."""
    from online import monitor

    cal = monitor.calibrate(load_artifact(street_run))
    cfg = monitor.MonitorConfig(min_samples=20, drift_window=50)
    src = cal.source.features
    stream = src[1:][np.random.default_rng(3).permutation(len(src) - 1)]
    probe = np.repeat(src[:1], 4 * len(src), axis=0)
    window = np.concatenate([stream, probe])  # the probe's burst is the newest rows
    x = monitor.usable(window, cal.art.head.dim)
    assert len(x) == len(src) and np.allclose(x[-1], src[0] / np.linalg.norm(src[0]), atol=1e-6)
    np.testing.assert_allclose(x[:-1], stream / np.linalg.norm(stream, axis=1, keepdims=True))
    fig = monitor.compute(cal, window, cfg)
    assert fig["n"] == len(src) and fig["estimated_accuracy"] is not None
    assert fig["estimated_accuracy"] == monitor.compute(cal, x, cfg)["estimated_accuracy"]
    assert monitor.drift(cal, window, cfg)["drifted"] is False


def test_after_a_swap_the_monitor_judges_the_new_head_on_the_traffic_it_served(
    street_run, tmp_path
):
    """A head adapted on the window's traffic is not estimated on those rows: the monitor
    reads, of the newest window, the rows the served version answered (none yet just after
    the swap: null figures that say so), through the real state and store."""
    import shutil

    from mp2a.head import Head
    from online.monitor import Monitor, MonitorConfig
    from online.state import FileState

    run = tmp_path / "run"
    shutil.copytree(street_run, run, ignore=shutil.ignore_patterns("traffic.sqlite*", "versions"))
    state = FileState(run)
    cfg = MonitorConfig(window=500, min_samples=20)
    mon = Monitor(read=state.read_traffic, current=state.load_current, sites=list, cfg=cfg)
    src = mon._calibrated("").source.features  # the artifact's own labelled source rows
    store = state.open_store(src.shape[1])
    half = len(src) // 2
    for e in src[:half]:
        assert store.offer(e, 0, 0.9, "1")
    store.flush(30)
    assert mon.refresh()["n"] == half >= cfg.min_samples
    base = state.load_current()
    v2 = state.publish(
        Head(base.head.weight.copy(), base.head.logit_scale), {"note": "adapted"}, parent=1,
        prompts=None, decision=None, method="test", prompt_config=None, rows=None,
    )  # fmt: skip
    fig = mon.refresh()
    assert fig["version"] == str(v2) and fig["n"] == 0 and fig["estimated_accuracy"] is None
    assert f"served by version {v2}" in fig["reason"], fig
    for e in src[half:]:
        assert store.offer(e, 0, 0.9, str(v2))
    store.flush(30)
    store.close()
    fig = mon.refresh()
    assert (
        fig["n"] == len(src) - half
        and fig["estimated_accuracy"] is not None
        and fig["reason"] is None
    )
    state.close()
