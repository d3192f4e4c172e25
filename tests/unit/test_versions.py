"""The version store on real files: publish, rollback, history, pruning, and crashes
(partial folders, damaged CURRENT, real SIGKILLs of a publishing process)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from test_artifact import small_contents  # same folder (pytest puts it on the path)

from mp2a import versions
from mp2a.artifact import (
    HEAD_FILE,
    SOURCE_FEATURES_FILE,
    load_artifact,
    write_artifact,
)
from mp2a.errors import ArtifactError
from mp2a.head import Head, l2_normalize

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A small real artifact (3 classes, D=8): version 1."""
    c = small_contents()  # test_artifact.py's, with this module's head
    c = dataclasses.replace(c, head=head(0), metrics={"method": "zeroshot"}, extra_files={})
    return write_artifact(tmp_path / "run", c)


def head(seed: int) -> Head:
    w = l2_normalize(np.random.default_rng(seed).normal(size=(2, 3, 8)).astype(np.float32))
    return Head(w, 40.0 + seed)


def test_unpublished_run_serves_itself(run):
    assert versions.current(run) == 1
    assert versions.load_current(run).path == run
    [only] = versions.history(run)
    assert only["version"] == 1 and only["served"] and only["parent"] is None


def test_a_version_without_prompts_has_no_prompt_config(run):
    v = versions.publish(run, head(1), {}, prompt_config={"template": "ignored {}"})
    assert load_artifact(run / "versions" / str(v)).manifest["prompt"] is None


def test_publish_writes_a_complete_version_and_moves_current(run):
    h = head(1)
    prompts = {"ctx": np.ones((4, 8), np.float32)}
    cfg = {"template": "a {}.", "n_class_ctx": 4}
    v = versions.publish(
        run, h, {"acc": 0.9}, decision={"accepted": True}, prompts=prompts, prompt_config=cfg
    )
    assert v == 2 and versions.current(run) == 2
    art = load_artifact(run / "versions" / "2")  # a complete artifact on its own
    np.testing.assert_array_equal(art.head.weight, h.weight)
    assert art.head.logit_scale == pytest.approx(41.0)
    assert art.manifest["parent_version"] == 1 and art.manifest["decision"] == {"accepted": True}
    assert art.classes == load_artifact(run).classes and art.metrics() == {"acc": 0.9}
    assert "prompts.safetensors" in art.manifest["files"] and art.manifest["prompt"] == cfg
    # the big source features are shared with the base, not copied
    base_sf, new_sf = run / SOURCE_FEATURES_FILE, art.path / SOURCE_FEATURES_FILE
    assert os.stat(base_sf).st_ino == os.stat(new_sf).st_ino
    assert not (art.path / "export").exists()
    assert json.loads((run / "versions" / "CURRENT").read_text())["version"] == 2
    assert versions.publish(run, head(2), {}) == 3
    assert versions.load_current(run).manifest["parent_version"] == 2
    hist = versions.history(run)
    assert [e["version"] for e in hist] == [3, 2, 1]
    assert [e["served"] for e in hist] == [True, False, False]
    assert hist[1]["metrics"] == {"acc": 0.9} and hist[0]["parent"] == 2
    assert versions.ancestors(run, versions.load_current(run)) == [2, 1]


def test_publish_refuses_a_head_of_another_shape(run):
    bad = Head(l2_normalize(np.ones((1, 4, 8), np.float32)), 10.0)
    with pytest.raises(ArtifactError, match="does not fit"):
        versions.publish(run, bad, {})
    assert versions.current(run) == 1


def test_rollback_goes_to_the_parent_and_marks_the_withdrawn_version(run):
    with pytest.raises(ArtifactError, match="nothing to roll back"):
        versions.rollback(run)
    versions.publish(run, head(1), {})
    versions.publish(run, head(2), {})
    assert versions.rollback(run) == 2
    assert versions.current(run) == 2
    assert versions.rollback(run) == 1
    hist = {e["version"]: e for e in versions.history(run)}
    assert hist[3]["rolled_back"]["to"] == 2 and hist[2]["rolled_back"]["to"] == 1
    assert hist[1]["served"]
    # numbers are never reused: the next publish is 4, child of the served version
    assert versions.publish(run, head(3), {}) == 4
    assert versions.load_current(run).manifest["parent_version"] == 1


def test_keep_last_k_never_deletes_the_served_version_or_the_base(run, monkeypatch):
    def kept() -> list[int]:
        return sorted(int(p.name) for p in (run / "versions").iterdir() if p.name.isdigit())

    monkeypatch.setenv("MP2A_KEEP_VERSIONS", "2")
    for i in range(4):
        versions.publish(run, head(i), {})
    assert kept() == [4, 5]
    assert versions.rollback(run) == 4
    assert versions.publish(run, head(9), {}) == 6  # child of 4; 4 is no longer served
    assert kept() == [5, 6]
    monkeypatch.setenv("MP2A_KEEP_VERSIONS", "1")
    # 6's parent 4 is pruned and 5 was rolled back: the base is what is left
    assert versions.rollback(run) == 1
    assert kept() == [5, 6]  # a rollback prunes nothing
    assert versions.publish(run, head(10), {}) == 7
    assert kept() == [7]
    assert load_artifact(run).version == 1  # the base stays whatever K is
    versions.rollback(run)
    versions.publish(run, head(11), {})  # 8, keeps only itself; 1 is RUN
    assert kept() == [8] and versions.current(run) == 8
    monkeypatch.setenv("MP2A_KEEP_VERSIONS", "0")
    with pytest.raises(ArtifactError, match="MP2A_KEEP_VERSIONS"):
        versions.publish(run, head(12), {})


def test_partial_version_folder_is_never_served(run):
    versions.publish(run, head(1), {})
    # publish renames only complete folders, but a stray incomplete one (a copy by hand,
    # disk trouble) must never be served, nor a crashed publisher's temp folder
    partial = run / "versions" / "3"
    partial.mkdir()
    (partial / HEAD_FILE).write_bytes(b"half a head")
    tmp = run / "versions" / ".tmp-4-crashed"
    tmp.mkdir()
    (tmp / HEAD_FILE).write_bytes(b"x")
    assert versions.current(run) == 2
    (run / "versions" / "CURRENT").write_bytes(b'{"vers')  # damaged pointer
    art = versions.load_current(run)
    assert art.version == 2  # newest complete version, the partial 3 skipped
    v = versions.publish(run, head(2), {})  # cleans the crashed temp folder
    assert v == 4 and not tmp.exists() and versions.current(run) == 4


def test_damaged_current_and_damaged_versions_fall_back_to_a_verified_one(run):
    versions.publish(run, head(1), {})
    versions.publish(run, head(2), {})
    cur = run / "versions" / "CURRENT"
    cur.write_bytes(b"\x00\xff garbage")
    assert versions.load_current(run).version == 3
    cur.write_text('{"version": 99}')  # names a version that does not exist
    assert versions.load_current(run).version == 3
    cur.write_text('{"version": 3}')
    h3 = run / "versions" / "3" / HEAD_FILE
    h3.write_bytes(h3.read_bytes()[:-4] + b"oops")  # fails its checksum
    assert versions.load_current(run).version == 2
    with pytest.raises(ArtifactError, match="sha256"):
        versions.load_version(run, 3)
    # no pointer at all: the first publish crashed before moving it, so RUN is what was served
    cur.unlink()
    assert versions.load_current(run).version == 1


def test_a_damaged_pointer_heals_once_counted_and_logged(run, caplog):
    """A damaged CURRENT, or one naming a version whose head fails its checksum: the newest
    verified version is served and CURRENT is repaired to name it (the damaged pointer moved
    aside), counted in mp2a_state_healed_total{what="versions"} and said in one log line;
    later reads are quiet. A hub's site line heals the same way."""
    import logging

    from mp2a.metrics import get_metrics

    def healed() -> float:
        return get_metrics().state_healed.labels(what="versions")._value.get()

    for site in ("", "south"):
        versions.publish(run, head(1), {}, site=site)
        versions.publish(run, head(2), {}, site=site)
        cur = versions.current_file(run, site)
        before = healed()
        with caplog.at_level(logging.ERROR, logger="mp2a.versions"):
            caplog.clear()
            cur.write_bytes(b"\x00\xff garbage")
            assert [versions.load_current(run, site).version for _ in range(3)] == [3, 3, 3]
            assert json.loads(cur.read_text())["version"] == 3
            damaged = sorted(cur.parent.glob("CURRENT.damaged-*"))
            assert len(damaged) == 1 and damaged[0].read_bytes() == b"\x00\xff garbage"
            h3 = versions.version_path(run, 3, site) / HEAD_FILE
            h3.write_bytes(h3.read_bytes()[:-4] + b"oops")  # the served head, damaged
            assert [versions.load_current(run, site).version for _ in range(3)] == [2, 2, 2]
            assert json.loads(cur.read_text())["version"] == 2
            lines = [r.getMessage() for r in caplog.records]
        assert healed() == before + 2 and len(lines) == 2, lines
        assert "CURRENT is damaged" in lines[0] and "serving version 3" in lines[0]
        assert "fails to load" in lines[1] and "serving version 2" in lines[1]
        cur.write_bytes(b"{")  # damaged again: a publish repairs it under its own lock
        assert versions.publish(run, head(3), {}, site=site) == 4  # the line goes on
        assert versions.load_current(run, site).version == 4


PUBLISHER = textwrap.dedent(
    """\
    import sys, numpy as np
    from mp2a import versions
    from mp2a.head import Head, l2_normalize
    run, i = sys.argv[1], 0
    while True:
        w = l2_normalize(np.random.default_rng(i).normal(size=(2, 3, 8)).astype(np.float32))
        versions.publish(run, Head(w, 50.0), {"i": i})
        if i == 0:  # killed from now on: after one publish, on a machine however busy
            print("ready", flush=True)
        i += 1
    """
)


def test_sigkill_mid_publish_leaves_a_verified_current(run, tmp_path, monkeypatch):
    """A real process publishing in a loop, killed with SIGKILL at varied moments: each time
    CURRENT names (or load_current finds) a complete, checksum-verified version."""
    monkeypatch.setenv("MP2A_KEEP_VERSIONS", "3")
    script = tmp_path / "publisher.py"
    script.write_text(PUBLISHER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    seen = set()
    for delay in (0.05, 0.13, 0.21, 0.37, 0.5):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(run)], env=env, stdout=subprocess.PIPE
        )
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        art = versions.load_current(run)  # verifies every checksum or raises
        pointed = json.loads((run / "versions" / "CURRENT").read_text())["version"]
        assert art.version == pointed
        seen.add(art.version)
        kept = [p for p in (run / "versions").iterdir() if p.name.isdigit()]
        assert len(kept) <= 4  # K, plus at most one renamed before the crash could prune
    assert max(seen) > 2, "the publisher must have published before being killed"
    versions.publish(run, head(5), {})  # the store is usable after the crashes
    assert not [p for p in (run / "versions").iterdir() if p.name.startswith(".tmp-")]


def test_a_full_disk_during_a_publish_leaves_the_served_version(run, tmp_path):
    """A real process publishing with RLIMIT_FSIZE under the size of a head (writes fail with
    EFBIG, as on a full disk): the publish fails with an OSError, CURRENT still names a
    verified version, and the next publish (space again) cleans up and succeeds."""
    import resource

    versions.publish(run, head(1), {})
    script = tmp_path / "publish_once.py"
    script.write_text(PUBLISHER.replace("while True:", "for _ in range(1):"))
    limit = 64  # bytes: smaller than any file of a version

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run(
        [sys.executable, str(script), str(run)],
        env=env,
        preexec_fn=small_files,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "File too large" in r.stderr, r.stderr[-2000:]
    assert "in publish" in r.stderr  # it failed writing the version, not before
    assert versions.load_current(run).version == 2
    assert json.loads(versions.current_file(run).read_text())["version"] == 2
    assert versions.publish(run, head(2), {}) == 3  # space again
    assert not [p for p in (run / "versions").iterdir() if p.name.startswith(".tmp-")]


def test_decisions_are_appended_newest_first_capped_and_damage_tolerant(run, monkeypatch):
    assert versions.decisions(run) == []
    for i in range(5):
        versions.record_decision(run, {"state": "rejected", "i": i, "reasons": ["r"]})
    got = versions.decisions(run)
    assert [d["i"] for d in got] == [4, 3, 2, 1, 0] and all(d["recorded_at"] for d in got)
    assert [d["i"] for d in versions.decisions(run, limit=2)] == [4, 3]
    with open(versions.versions_dir(run) / versions.DECISIONS, "a") as f:
        f.write('{"half a line')  # a crash mid-append: no newline
    versions.record_decision(run, {"state": "accepted", "i": 5})
    assert [d["i"] for d in versions.decisions(run)] == [5, 4, 3, 2, 1, 0]
    monkeypatch.setattr(versions, "MAX_DECISIONS", 3)
    versions.record_decision(run, {"state": "failed", "i": 6})
    assert [d["i"] for d in versions.decisions(run)] == [6, 5]  # 3 lines: 6, 5, the damaged
    assert not list(versions.versions_dir(run).glob(versions.TMP_PREFIX + "*"))
