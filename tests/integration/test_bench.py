"""`mp2a bench … --json` prints one JSON object with the figures (no timing asserts here)."""

import json

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
    else:
        assert r["matmul_fp32_gflops"] > 0
        assert {1, 32} == {x["batch"] for x in r["results"]}
        for x in r["results"]:
            assert x["torch_eager_images_per_s"] > 0 and x["ort_int8_images_per_s"] > 0


def test_bench_online_quick_runs_the_loop_on_a_real_server(capsys):
    """The quick online bench: real `MP2A_ONLINE=1 mp2a serve`, a shifted stream stored, one
    POST /adapt run to its end, accuracy and latency figures from the served answers."""
    assert main(["bench", "online", "--json", "--quick"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0
    r = json.loads(out)
    assert r["bench"] == "online" and r["stream_domain"] == "handwritten"
    assert r["adapted_for"] == "printed" and r["artifact_sources"] == ["textured", "street"]
    assert r["stream_images"] == 300 and r["served_versions_before"] == ["1"]
    a = r["adaptation"]
    assert a["state"] in ("accepted", "rejected"), a
    assert a["n_traffic"] == 300 and a["seconds"] > 0 and a["gate"]["n_traffic_holdout"] == 60
    if a["state"] == "accepted":
        assert r["served_version_after"] == str(a["version"]) == "2"
    else:
        assert r["served_version_after"] == "1"
        assert r["accuracy"]["stream_after"] == r["accuracy"]["stream_before"]
    for k in ("stream_before", "stream_after", "fresh_before", "fresh_after"):
        assert 0.1 < r["accuracy"][k] <= 1.0  # ten classes: well above chance
    lat = r["latency"]
    for phase in ("idle", "during_adaptation"):
        assert lat[phase]["requests"] > 0 and lat[phase]["errors"] == 0
        assert 0 < lat[phase]["p50_ms"] <= lat[phase]["p99_ms"]
    assert lat["p99_ratio"] == pytest.approx(
        lat["during_adaptation"]["p99_ms"] / lat["idle"]["p99_ms"], abs=1e-3
    )
    assert r["targets"]["adaptation_lt_60_s_on_10k"] is False  # 300 samples: not measured


def test_bench_online_refuses_bad_settings(capsys):
    assert main(["bench", "online", "--quick", "--refine", "-1"]) == 2
    assert "--refine must be >= 0" in capsys.readouterr().err
