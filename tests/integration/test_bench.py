"""`mp2a bench … --json` prints one JSON object with the figures (no timing asserts here)."""

import json
from pathlib import Path

import pytest

from mp2a.cli import main


@pytest.mark.parametrize("what", ["adapt", "export"])
def test_bench_quick_prints_one_json_object(what, capsys):
    assert main(["bench", what, "--json", "--quick"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0  # one line: nothing else on stdout
    r = json.loads(out)
    assert r["bench"] == what and r["results"]
    row = r["results"][0]
    assert row["model"] == "tiny-digits"
    if what == "adapt":
        assert row["epoch_seconds_cached"] > 0 and row["epoch_seconds_reencode"] > 0
        assert row["speedup"] == pytest.approx(
            row["epoch_seconds_reencode"] / row["epoch_seconds_cached"], rel=0.01
        )
        ex = row["extraction"]  # torch vs ONNX Runtime over the same images
        assert ex["images"] == 4 * row["images_per_domain"] and ex["rounds"] == 3
        assert len(ex["images_per_s_torch"]) == len(ex["images_per_s_onnx"]) == 3
        assert min(ex["images_per_s_torch"] + ex["images_per_s_onnx"]) > 0
        assert ex["min_cosine"] >= 0.9999
    else:
        assert r["matmul_fp32_gflops"] > 0
        assert {1, 32} == {x["batch"] for x in r["results"]}
        for x in r["results"]:
            assert x["torch_eager_images_per_s"] > 0 and x["ort_int8_images_per_s"] > 0


def test_bench_online_quick_runs_the_loop_on_a_real_server(capsys):
    """The quick online bench: real `MP2A_ONLINE=1 mp2a serve` per scenario, a shifted stream
    stored, one POST /adapt run to its end, accuracy and latency figures from the served
    answers; a harmful stream rejected; the permuted candidate and the drift rounds."""
    assert main(["bench", "online", "--json", "--quick"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0
    r = json.loads(out)
    assert r["bench"] == "online" and r["stream_domain"] == "handwritten"
    assert r["adapted_for"] == "printed" and r["artifact_sources"] == ["textured", "street"]
    main_stream = r["streams"]["handwritten"]
    assert main_stream["stream_images"] == 300 and main_stream["served_versions_before"] == ["1"]
    a = main_stream["adaptation"]
    assert a["state"] in ("accepted", "rejected"), a
    assert a["method"] == "mp2a-t" and a["seconds"] > 0
    # the probe's repeats of one image count once and the read reaches past them to 300
    # distinct images: every 5th distinct sample is held out and what looks out of the
    # label set is left out (online/estimate.py ood_scores)
    distinct = a["n_traffic"] - a["n_traffic_duplicates"]
    assert a["n_traffic"] >= 300 and distinct == 300
    assert a["n_traffic_used"] == distinct - a["n_traffic_ood"]
    assert a["gate"]["n_stream_holdout"] == -(-distinct // 5)  # the stream's guards see all
    assert a["gate"]["n_traffic_holdout"] <= a["gate"]["n_stream_holdout"]  # in-set only
    assert "estimated_gain" in a["gate"]
    if a["state"] == "accepted":
        assert main_stream["served_version_after"] == str(a["version"]) == "2"
    else:
        assert main_stream["served_version_after"] == "1"
        acc = main_stream["accuracy"]
        assert acc["stream_after"] == acc["stream_before"]
    for k in ("stream_before", "stream_after", "fresh_before", "fresh_after"):
        assert 0.1 < main_stream["accuracy"][k] <= 1.0  # ten classes: well above chance
    lat = main_stream["latency"]
    for phase in ("idle", "during_adaptation"):
        assert lat[phase]["requests"] > 0 and lat[phase]["errors"] == 0
        assert 0 < lat[phase]["p50_ms"] <= lat[phase]["p99_ms"]
    assert lat["p99_ratio"] == pytest.approx(
        lat["during_adaptation"]["p99_ms"] / lat["idle"]["p99_ms"], abs=1e-3
    )
    noise = r["harmful"]["noise"]
    assert noise["adaptation"]["state"] == "rejected" and noise["served_version_after"] == "1"
    assert r["permuted_candidate"]["accepted"] is False
    assert any("prompt rows" in s for s in r["permuted_candidate"]["reasons"])
    assert r["targets"]["no_harmful_accepted"] is True and r["targets"]["harmful_accepted"] == []
    d = r["drift"]
    assert [row["round"] for row in d["rounds"]] == [0, 1, 2]
    assert all(row["state"] in ("accepted", "rejected") for row in d["rounds"][1:])
    assert r["targets"]["adaptation_lt_60_s_on_10k"] is False  # 300 samples: not measured


def test_bench_online_refuses_bad_settings(capsys):
    assert main(["bench", "online", "--quick", "--method", "magic"]) == 2
    assert "--method 'magic': choose mp2a-t or mp2a" in capsys.readouterr().err
    assert main(["bench", "online", "--quick", "--source-margin", "2"]) == 2
    assert "--source-margin must be in 0..1" in capsys.readouterr().err


def test_bench_fleet_quick_runs_three_replicas_on_a_real_postgresql(
    street_run, digits_small, tmp_path
):
    """The quick fleet bench: its own PostgreSQL, three real replicas under load with
    publishes and rollbacks, ingest into both stores, p99 side by side, a real kill -9 (on
    the session's zero-shot street artifact: the bench would make the same one)."""
    from benchmarks.fleet import run as run_fleet

    r = json.loads(json.dumps(run_fleet(quick=True, work=tmp_path / "w",
                                        base=(street_run, digits_small))))  # fmt: skip
    s = r["swaps_under_load"]
    assert s["replicas"] == 3 and s["publishes"] == 10 and s["rollbacks"] == 2
    assert s["load"]["requests"] > 0 and s["load"]["failed"] == 0
    assert len(s["all_replicas_swapped_ms"]) == 12
    assert all(ms is None or ms > 0 for ms in s["all_replicas_swapped_ms"])
    for name in ("postgresql", "sqlite"):
        assert r["ingest"][name]["rows"] == r["ingest"][name]["samples"] == 2000
    p99 = r["prediction_p99"]
    assert len(p99["runs"]["postgresql"]) == len(p99["runs"]["sqlite"]) == 1  # twice in full
    assert all(run["failed"] == 0 for runs in p99["runs"].values() for run in runs)
    t = r["takeover"]
    assert t["killed_run_recorded"] == 1 and t["next_run_recorded"] == 1
    assert t["next_run_state"] in ("accepted", "rejected") and t["takeover_seconds"] > 0
    assert set(r["targets"]) >= {"swap_p99_le_1_s", "takeover_le_10_s", "ingest_ge_5000_per_s"}


def test_bench_edge_quick_runs_a_hub_and_two_edges(capsys):
    """The quick edge bench: a real hub and two real edges, one adaptation round per site,
    the hub killed -9 while an edge is probed; every figure of the table is there."""
    assert main(["bench", "edge", "--json", "--quick"]) == 0
    r = json.loads(capsys.readouterr().out.strip())
    assert set(r["sites"]) == set(r["plan"]["sites"]) == {"hand", "lcd"}  # three in full
    for site in r["sites"].values():
        assert site["adaptation"]["state"] in ("accepted", "rejected")
        assert site["samples_at_hub"] > 0 and 0 <= site["stream_after"] <= 1
        if site["adaptation"]["state"] == "accepted":
            assert 0 < site["publish_to_edge_swap_s"] < 60
        else:  # a rejected head is never installed: the edge serves what it served
            assert site["stream_after"] == site["stream_before"]
    o = r["outage"]
    assert o["failed_predictions"] == 0 and o["hub_down"]["requests"] > 0
    # everything served while the hub was down is delivered or counted as dropped
    assert o["delivered_after_restart"] + o["dropped_counted"] >= o["served_while_down"]
    # the cap is applied once a second: at most a second of the probe's samples over it
    assert o["buffered_at_restart"] <= o["buffer_cap"] + o["probe_rate_per_s"]
    assert set(r["targets"]) >= {"hub_down_p99_le_1_2x", "publish_to_swap_le_5_s"}


def test_bench_estimate_quick_measures_every_decision_against_the_labels(capsys):
    """The quick estimate bench: real artifacts, streams embedded by their encoder, the
    worker's own candidate and gate; every estimator's error against the labels, the gate's
    decision against the true gain, a harmful stream refused, and a drift run through a real
    traffic store that is flagged after the change and never before it."""
    assert main(["bench", "estimate", "--json", "--quick"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0
    r = json.loads(out)
    assert r["bench"] == "estimate" and r["default_method"] == "atc-slope"
    by_stream = {c["stream"]: c for c in r["cases"]}
    lcd, noise = by_stream["lcd"], by_stream["noise"]
    assert 0.1 < lcd["true_serving"] <= 1.0 and lcd["true_gain"] is not None
    est = lcd["estimates_serving"]["atc-slope"]
    assert est["low"] <= est["value"] <= est["high"]
    assert r["estimator_error"]["atc-slope"]["cases"] == 1  # the noise stream has no truth
    assert noise["true_gain"] is None and not noise["accepted"]
    assert r["gate_confusion"]["harmful_rejected"] == 1
    # a zero-shot base: a first adaptation, judged on the plain gain by the default rule,
    # whose decisions the replay of the recorded figures reproduces
    assert lcd["serving_adapted"] is False and lcd["gain_corrected"] is False
    assert set(r["gate_confusion_by_rule"]) == {"auto", "sources", "none"}
    assert r["gate_confusion_by_rule"]["auto"] == r["gate_confusion"]
    assert r["targets"]["mixed_accepted_with_80pct_of_clean_gain"] is None  # no mixed stream
    assert lcd["slice"] == 0 and r["plan"]["slices"] == 1  # one draw per size
    served = r["served_change_by_rule"]  # the harmful stream is not a run that can gain
    assert served["recorded"]["runs"] == 1
    assert served["recorded"]["mean_change"] == pytest.approx(
        lcd["true_gain"] if lcd["accepted"] else 0.0, abs=1e-4
    )
    d = r["drift"]
    assert d["triggers_before_change"] == 0
    assert d["samples_after_change_until_flagged"] is not None
    assert d["samples_after_change_until_flagged"] <= 200
    assert len(d["timeline"]) == 8 and all(0 <= t["true"] <= 1 for t in d["timeline"])
    from benchmarks.estimate import markdown

    md = markdown(r)  # docs/ESTIMATES.md's tables
    assert "| `atc-slope` (default) |" in md and "| lcd |" in md
    assert md.rstrip().splitlines()[-1].startswith("Targets: estimate_mae_le_3pts ")


def test_bench_serving_photo_workloads_read_a_relative_imagefolder(tmp_path, monkeypatch):
    """`--photos` given relative to the working folder (as a user types it): every linked
    photo of the workload is readable by the load generator."""
    from PIL import Image

    from benchmarks.serving import make_workloads

    for cls in ("mug", "pen"):
        d = tmp_path / "photos" / "dslr" / cls
        d.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), (i * 60, 10, 200)).save(d / f"{i}.jpg")
    monkeypatch.chdir(tmp_path)
    out = make_workloads(tmp_path / "work", ("dslr", "webcam"), Path("photos"))
    assert set(out) == {"dslr"}  # no webcam folder: that workload is left out
    files = sorted(out["dslr"].iterdir())
    assert len(files) == 6
    assert all(f.is_file() and Image.open(f).size == (40, 30) for f in files)


def test_bench_serving_compares_an_int8_service_with_the_int8_reference():
    """The summary's reference runs the service's own encoder: an int8 service is compared
    with the int8 reference when it was measured, and a narrowed run without the service
    is skipped rather than failing the whole benchmark."""
    from benchmarks.serving import _summary

    def rows(rps: float) -> list[dict]:
        return [{"concurrency": c, "requests_per_s": rps, "p50_ms": 10.0, "p99_ms": 20.0}
                for c in (1, 8, 32)]  # fmt: skip

    both = {"ort-int8": rows(4.0), "bare": rows(2.0), "bare-int8": rows(5.0)}
    s = _summary({"ViT-B-16": {"dslr": both}})["ViT-B-16"]
    assert s["dslr_service_vs_bare_throughput_c8"] == 0.8  # 4 / 5, not 4 / 2
    fp32_only = {"ort-int8": rows(4.0), "bare": rows(2.0)}
    assert _summary({"m": {"dslr": fp32_only}})["m"]["dslr_service_vs_bare_throughput_c8"] == 2.0
    assert _summary({"m": {"dslr": {"bare-int8": rows(5.0)}}}) == {"m": {}}
    # the processes each variant ran are recorded beside the workloads, not read as one;
    # one process of the service is compared with one process of the reference
    one = {
        "ort": rows(6.0),
        "bare": rows(6.0),
        "ort-1-worker": rows(3.0),
        "bare-1-worker": rows(4.0),
    }
    s = _summary({"m": {"jpeg256": one, "worker_processes": {"ort": 2, "bare": 2}}})["m"]
    assert s["jpeg256_service_vs_bare_throughput_c8"] == 1.0
    assert s["jpeg256_1_worker_vs_bare_1_worker_throughput_c8"] == 0.75
    assert s["jpeg256_1_worker_vs_bare_throughput_c8"] == 0.5


def test_bench_load_labels_each_part_with_its_own_media_type():
    """A PNG sent as image/jpeg fails on servers that trust the label (BentoML's PIL input):
    the load generator labels each part as the image is."""
    from benchmarks.serving import bench_image, multipart, screenshot_png

    body = multipart([bench_image(32), screenshot_png()])
    assert body.count(b"Content-Type: image/jpeg") == 1
    assert body.count(b"Content-Type: image/png") == 1
    assert b"Content-Type: image/png" in multipart(screenshot_png(), "image", "image/png")


def test_bench_serving_rounds_combine_into_one_row_per_level():
    """A level measured in rounds: throughput over the rounds' summed time (not a mean of
    rates), percentiles of the pooled latencies, errors and requests added up."""
    from benchmarks.serving import combine_rounds

    def rnd(lat: list[float], seconds: float, errors: int = 0) -> dict:
        return {"concurrency": 8, "requests": len(lat) + errors, "errors": errors,
                "seconds": seconds, "requests_per_s": len(lat) / seconds, "latencies_ms": lat,
                "stage_mean_ms": {"model": 2.0}}  # fmt: skip

    row = combine_rounds([rnd([10.0] * 90, 1.0), rnd([30.0] * 10, 1.0, errors=2)])
    assert row["requests"] == 102 and row["errors"] == 2 and row["seconds"] == 2.0
    assert row["requests_per_s"] == 50.0  # 100 answers in 2 s (the mean of rates: 50 too)
    assert row["p50_ms"] == 10.0 and row["p99_ms"] == 30.0 and row["mean_ms"] == 12.0
    assert row["rounds_requests_per_s"] == [90.0, 10.0]
    row = combine_rounds([rnd([10.0] * 90, 1.0), rnd([10.0] * 10, 9.0)])
    assert row["requests_per_s"] == 10.0  # 100 in 10 s, where the mean of rates says 45.6
    assert "latencies_ms" not in row and row["stage_mean_ms"] == {"model": 2.0}
