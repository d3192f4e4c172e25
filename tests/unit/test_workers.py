"""MP2A_WORKERS: a number, or auto (serving/workers.py) — the rule, the inherited choice, the
real measurement of an exported encoder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from serving import workers


def measure(ms_by_threads):
    return lambda threads: [ms_by_threads(t) for t in threads]


def flat(ms: float):
    return measure(lambda t: ms)  # a model the cores do not speed up


def scaling(ms_one_thread: float):
    return measure(lambda t: ms_one_thread / t)  # a model that uses every core


def test_a_model_the_cores_do_not_speed_up_gets_a_worker_per_core():
    chosen = workers.choose(4, flat(0.3))
    assert chosen.count == 4 and chosen.chosen == "auto"
    assert chosen.encoder_ms == {"1": 0.3, "4": 0.3}
    assert "0.30 ms on 1 thread" in chosen.reason


def test_a_model_that_uses_the_cores_gets_one_worker():
    chosen = workers.choose(2, scaling(400.0))  # ViT-B-16-like on 2 cores: 400 vs 200 ms
    assert chosen.count == 1
    assert chosen.encoder_ms == {"1": 400.0, "2": 200.0}


def test_the_lone_request_cost_is_the_boundary():
    # one thread costs exactly LONE_COST_MS more: still cheap enough; a little more: one worker
    lone = workers.LONE_COST_MS
    assert workers.choose(2, measure(lambda t: 2 * lone if t == 1 else lone)).count == 2
    assert workers.choose(2, measure(lambda t: 2.5 * lone if t == 1 else lone)).count == 1


def test_auto_is_bounded_and_one_core_measures_nothing():
    assert workers.choose(64, flat(0.1)).count == workers.MAX_AUTO

    def never(threads):
        raise AssertionError("measured on one core")

    assert workers.choose(1, never).count == 1


def test_a_number_is_taken_as_given_and_bad_values_are_refused(tmp_path):
    chosen = workers.resolve({"MP2A_WORKERS": "3"}, tmp_path, cores=2)
    assert (chosen.count, chosen.chosen) == (3, "MP2A_WORKERS")
    assert workers.child_env(chosen) == []  # nothing measured, nothing to pass on
    for auto in ("", " auto ", "AUTO"):
        assert workers.requested({"MP2A_WORKERS": auto}) is None
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ValueError, match="MP2A_WORKERS"):
            workers.resolve({"MP2A_WORKERS": bad}, tmp_path, cores=2)


def test_auto_without_an_exported_encoder_serves_with_one_and_says_why(tmp_path):
    chosen = workers.resolve({}, tmp_path / "missing", cores=2)
    assert chosen.count == 1 and "could not time the encoder" in chosen.reason
    torch = workers.resolve({"MP2A_BACKEND": "torch", "MP2A_WORKERS": "auto"}, tmp_path, cores=2)
    assert torch.count == 1 and "torch" in torch.reason


def test_auto_measures_the_real_exported_encoder(street_run):
    chosen = workers.resolve({"MP2A_WORKERS": "auto"}, street_run, cores=2)
    ms = chosen.encoder_ms
    assert set(ms) == {"1", "2"} and all(0 < v < 1000 for v in ms.values())
    expected = 2 if ms["1"] - ms["2"] <= workers.LONE_COST_MS else 1
    assert chosen.count == expected
    # the int8 encoder is not exported for this artifact: measured it would fail, so one
    int8 = workers.resolve({"MP2A_PRECISION": "int8"}, street_run, cores=2)
    assert int8.count == 1 and "image_encoder.int8.onnx" in int8.reason


def test_a_worker_takes_its_parents_choice_and_nobody_elses(tmp_path):
    """The server passes its measurement to the processes it starts; a value from any other
    process (an image's baked environment) is measured again."""
    chosen = workers.Workers(2, "auto", "measured by the parent", {"1": 0.3, "2": 0.3})
    (env,) = workers.child_env(chosen)
    assert env["name"] == workers.CHOSEN_ENV and env["stage"] == "runtime"
    code = (
        "import json, sys; from pathlib import Path; from serving import workers; "
        "c = workers.resolve(dict(__import__('os').environ), Path(sys.argv[1]), 2); "
        "print(json.dumps([c.count, c.chosen, c.reason]))"
    )
    child = {**os.environ, env["name"]: env["value"]}
    child.pop("MP2A_WORKERS", None)
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=child, capture_output=True, text=True
    )
    assert json.loads(out.stdout) == [2, "auto", "measured by the parent"], out.stderr
    stale = json.loads(env["value"]) | {"pid": os.getpid() + 10**6}
    child[env["name"]] = json.dumps(stale)
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=child, capture_output=True, text=True
    )
    count, how, reason = json.loads(out.stdout)
    assert (count, how) == (1, "auto") and "could not time" in reason  # measured: no artifact


def test_the_cpu_count_follows_a_containers_cpu_limit(tmp_path):
    """A pod limited to 1.5 CPUs on a larger node: 2 (rounded up), not the node's cores; no
    limit ("max", -1) or no cgroup: the affinity's count."""
    from serving.backends import cpu_count

    cores = len(os.sched_getaffinity(0))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cpu_count(v2) == min(cores, 2)
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_count(v2) == cores
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_count(v1.parent) == 1
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_count(v1.parent) == cores
    assert cpu_count(tmp_path / "none") == cores
