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
