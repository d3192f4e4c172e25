"""`mp2a bench edge --json`: a hub and three edge sites, each its own domain, measured.

Setup (as `mp2a bench online`): DigitsDA with the shift styles, an artifact adapted by MP²A for
`printed` (sources textured + street), exported to ONNX. A hub (`mp2a serve`, MP2A_ONLINE=1,
files state) and three edges (`mp2a serve --hub --site`, each its own copy of the artifact),
all on loopback. Site `hand` sees handwritten digits, `lcd` seven-segment displays, `dots`
dot-matrix characters: a stream (seed 1) and a fresh draw (seed 0) each. Labels stay here.

1. One round: every edge serves its stream (the edge buffers and uploads it); POST /adapt
   for each site on the hub; each accepted head is installed by its edge. Served accuracy
   on each site's stream and fresh draw before and after; the seconds from the hub's publish
   to the edge answering with the new version.
2. The hub down for `down_seconds`: an open-loop probe of one edge (20 requests/s) with the
   hub up, then with the hub killed (-9), then after it restarts; p50/p99 and failures of
   each phase; the samples buffered while it was down and when the hub had them all; the
   buffer's cap (MP2A_STORE_MAX_ROWS on that edge) and the drops counted against it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.online import (
    Probe,
    _fresh_copy,
    _get,
    _images,
    _mp2a,
    _post,
    _shuffled,
    served_labels,
)
from benchmarks.procs import ServerProcess
from mp2a.errors import Mp2aError
from online.state import FileState
from online.supervisor import REPO_ROOT

SITES = {"hand": "handwritten", "lcd": "lcd", "dots": "dotmatrix"}
PROBED = "hand"


@dataclass(frozen=True)
class EdgePlan:
    per_class: int = 100  # DigitsDA for the artifact and the fresh draws
    stream_per_class: int = 300  # 3,000 images per site
    down_seconds: float = 60.0
    probe_seconds: float = 20.0
    probe_rate: float = 20.0
    buffer_cap: int = 1000  # MP2A_STORE_MAX_ROWS of the probed edge: below the outage's samples
    batch: int = 32
    steps_per_stage: int = 100  # of the base artifact's adaptation (3 stages)
    sites: tuple[str, ...] = tuple(SITES)  # the edges started (PROBED among them)

    @classmethod
    def quick(cls) -> EdgePlan:
        # two edges: every path of the table (a third site adds a server start and a run)
        return cls(per_class=8, stream_per_class=10, down_seconds=4, probe_seconds=3, buffer_cap=50,
                   steps_per_stage=20, sites=("hand", "lcd"))  # fmt: skip


def _prepare(plan: EdgePlan, work: Path) -> tuple[Path, Path, Path]:
    data, stream, run = work / "digits", work / "stream", work / "run"
    streams = [SITES[s] for s in plan.sites]
    domains = ["printed", "textured", "street", *streams]
    _mp2a("data", "digits", "--out", str(data), "--per-class", str(plan.per_class),
          "--domains", ",".join(domains), "--quiet")  # fmt: skip
    _mp2a("data", "digits", "--out", str(stream), "--seed", "1",
          "--per-class", str(plan.stream_per_class), "--domains", ",".join(streams),
          "--quiet")  # fmt: skip
    _mp2a("adapt", "--data", str(data), "--target", "printed", "--sources", "textured,street",
          "--method", "mp2a", "--out", str(run), "--stages", "3",
          "--steps-per-stage", str(plan.steps_per_stage),
          "--no-cache", "--quiet")  # fmt: skip
    _mp2a("export", str(run), "--format", "onnx")
    return data, stream, run


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _wait(what: str, check, timeout: float, every: float = 0.2):
    deadline = time.time() + timeout
    while not (got := check()):
        if time.time() > deadline:
            raise Mp2aError(f"bench edge: never {what} within {timeout:.0f} s")
        time.sleep(every)
    return got


def run(quick: bool = False, work: Path | None = None) -> dict:
    plan = EdgePlan.quick() if quick else EdgePlan()
    t_all = time.time()
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mp2a-edge-")))
        work.mkdir(parents=True, exist_ok=True)
        result = _run(plan, work, stack)
    result.update(seconds=round(time.time() - t_all, 1), cpu_count=os.cpu_count())
    return result


@contextlib.contextmanager
def hub_and_edges(
    hub_run: Path,
    edge_runs: dict[str, Path],
    work: Path,
    tokens: dict[str, str],
    admin: str,
    *,
    hub_env: dict[str, str] | None = None,
    edge_env: dict[str, dict[str, str]] | None = None,
) -> Iterator[tuple[ServerProcess, dict[str, ServerProcess]]]:
    """A hub (`mp2a serve` with the online loop, the admin and the sites' tokens; it adapts
    only when asked) and one edge server per site (`--hub URL --site S`), real processes
    stopped on exit. `hub_env` and `edge_env[site]` add or override settings."""
    env0 = {**os.environ, "BENTOML_DO_NOT_TRACK": "True"}
    serve = [sys.executable, "-m", "mp2a", "serve"]
    env = {
        **env0,
        "BENTOML_HOME": str(work / "bentoml-hub"),
        "MP2A_ONLINE": "1",
        "MP2A_ADMIN_TOKEN": admin,
        "MP2A_EDGE_TOKENS": ",".join(f"{s}={t}" for s, t in tokens.items()),
        "MP2A_ADAPT_MIN_SAMPLES": "20",
        "MP2A_ADAPT_INTERVAL_S": "1e9",
        "MP2A_ADAPT_MIN_NEW": str(10**9),
        **(hub_env or {}),
    }
    with contextlib.ExitStack() as stack:
        hub = ServerProcess([*serve, str(hub_run), "--host", "127.0.0.1"], env, work / "hub.log",
                            REPO_ROOT).start()  # fmt: skip
        stack.callback(hub.stop)
        edges: dict[str, ServerProcess] = {}
        for site, run in edge_runs.items():
            env = {
                **env0,
                "BENTOML_HOME": str(work / f"bentoml-{site}"),
                "MP2A_EDGE_TOKEN": tokens[site],
                **(edge_env or {}).get(site, {}),
            }
            cmd = [*serve, str(run), "--host", "127.0.0.1", "--hub", hub.url, "--site", site]
            edges[site] = ServerProcess(cmd, env, work / f"edge-{site}.log", REPO_ROOT).start()
            stack.callback(edges[site].stop)
        yield hub, edges


def _run(plan: EdgePlan, work: Path, stack: contextlib.ExitStack) -> dict:
    data, stream_root, base = _prepare(plan, work)
    classes = json.loads((data / "meta.json").read_text())["classes"]
    used = {s: SITES[s] for s in plan.sites}
    tokens = {s: secrets.token_hex(16) for s in used}
    admin = secrets.token_hex(16)
    hub_run = _fresh_copy(base, work / "hub")
    runs = {site: _fresh_copy(base, work / f"edge-{site}") for site in used}
    probed = {PROBED: {"MP2A_STORE_MAX_ROWS": str(plan.buffer_cap)}}
    hub, edges = stack.enter_context(
        hub_and_edges(hub_run, runs, work, tokens, admin, edge_env=probed)
    )

    hub_state = FileState(hub_run)
    inputs = {}
    sites: dict[str, dict] = {}
    for site, domain in used.items():
        stream, y_stream = _shuffled(*_images(stream_root, domain, classes))
        fresh, y_fresh = _images(data, domain, classes)
        inputs[site] = (stream, y_stream, fresh, y_fresh)
        url = edges[site].url
        pred, _ = served_labels(url, fresh, classes, plan.batch)
        sites[site] = {"domain": domain, "fresh_before": float((pred == y_fresh).mean())}
        done = 0
        pace = min(500, plan.buffer_cap)  # the probed edge's buffer is small: pace it
        for k in range(0, len(stream), pace):
            chunk = stream[k : k + pace]
            pred_chunk, _ = served_labels(url, chunk, classes, plan.batch)
            done += len(chunk)
            _wait(
                f"{site}'s traffic at the hub",
                lambda s=site, n=done: hub_state.traffic_count(s) >= n,
                120,
            )
            sites[site].setdefault("_pred", []).append(pred_chunk)
        pred = np.concatenate(sites[site].pop("_pred"))
        sites[site]["stream_before"] = float((pred == y_stream).mean())
        sites[site]["samples_at_hub"] = hub_state.traffic_count(site)

    auth = {"Authorization": f"Bearer {admin}"}
    for site in used:
        req = _post(
            hub.url + "/adapt", json.dumps({"site": site}).encode(), "application/json", auth
        )
        status = _wait(
            f"the {site} run ends",
            lambda s=site, r=req: (
                (st := _get(f"{hub.url}/adapt/status?site={s}"))["state"]
                in ("accepted", "rejected", "failed")
                and (st.get("request") or {}).get("id") == r["id"]
                and st
            ),
            600,
        )
        published = time.time()
        gate = status.get("gate") or {}
        sites[site]["adaptation"] = {
            k: status.get(k) for k in ("state", "reasons", "n_traffic", "seconds", "version")
        }
        sites[site]["adaptation"]["estimate"] = [
            gate.get("estimate_serving"),
            gate.get("estimate_candidate"),
        ]
        if status["state"] == "accepted":
            v = str(status["version"])
            _wait(
                f"{site}'s edge swaps",
                lambda u=edges[site].url, v=v: _get(u + "/model")["version"] == v,
                60,
                0.05,
            )
            sites[site]["publish_to_edge_swap_s"] = round(time.time() - published, 2)
    for site, (stream, y_stream, fresh, y_fresh) in inputs.items():
        url = edges[site].url
        pred, _ = served_labels(url, stream, classes, plan.batch)
        sites[site]["stream_after"] = float((pred == y_stream).mean())
        pred, _ = served_labels(url, fresh, classes, plan.batch)
        sites[site]["fresh_after"] = float((pred == y_fresh).mean())
        for k in ("stream", "fresh"):
            gain = sites[site][f"{k}_after"] - sites[site][f"{k}_before"]
            sites[site][f"{k}_gain_pts"] = round(100 * gain, 2)
        _wait(
            f"{site}'s uploads of the after-pass",
            lambda s=site: FileState(work / f"edge-{s}").traffic_count("") == 0,
            300,
        )

    # the hub down: the probed edge keeps answering and buffering
    edge = edges[PROBED]
    edge_state = FileState(work / f"edge-{PROBED}")
    image = inputs[PROBED][2][0]
    probe = Probe(edge.url, image, plan.probe_rate)
    _wait("the buffer is empty", lambda: edge_state.traffic_count("") == 0, 120)
    t_up = time.perf_counter() + plan.probe_seconds
    up = probe.figures(*probe.run(lambda: time.perf_counter() >= t_up))
    _wait("the hub has the probe's samples", lambda: edge_state.traffic_count("") == 0, 120)
    at_hub = hub_state.traffic_count(PROBED)
    dropped0 = _metric(edge.url, "mp2a_traffic_dropped_total")
    hub.kill9()
    t_down = time.perf_counter() + plan.down_seconds
    down = probe.figures(*probe.run(lambda: time.perf_counter() >= t_down))
    buffered = edge_state.traffic_count("")
    hub.start()
    t_back = time.time()
    delivered_by = _wait(
        "the buffer drains",
        lambda: edge_state.traffic_count("") == 0 and time.time(),
        600,
    )
    # read once drained: the buffer's cap is applied once a second, so the last evictions
    # of the outage may come after the hub is back
    dropped = _metric(edge.url, "mp2a_traffic_dropped_total") - dropped0
    after_hub = hub_state.traffic_count(PROBED) - at_hub
    t_after = time.perf_counter() + plan.probe_seconds
    after = probe.figures(*probe.run(lambda: time.perf_counter() >= t_after))
    outage = {
        "down_seconds": plan.down_seconds,
        "probe_rate_per_s": plan.probe_rate,
        "hub_up": up,
        "hub_down": down,
        "hub_back": after,
        "p99_ratio_down_over_up": round(down["p99_ms"] / up["p99_ms"], 3)
        if "p99_ms" in down and "p99_ms" in up
        else None,
        "failed_predictions": up["errors"] + down["errors"] + after["errors"],
        "buffer_cap": plan.buffer_cap,
        "served_while_down": down["requests"] + down["errors"],
        "buffered_at_restart": buffered,
        "dropped_counted": dropped,
        "delivered_after_restart": after_hub,
        "drain_seconds": round(delivered_by - t_back, 2),
    }
    ok_sites = {
        s: r["adaptation"]["state"] == "accepted" and r["stream_gain_pts"] >= 4
        for s, r in sites.items()
    }
    return {
        "bench": "edge",
        "plan": asdict(plan),
        "sites": sites,
        "outage": outage,
        "targets": {
            "every_site_ge_4_pts_on_its_stream": ok_sites,
            "no_site_drops": all(
                r["stream_gain_pts"] >= 0 and r["fresh_gain_pts"] >= 0 for r in sites.values()
            ),
            "hub_down_p99_le_1_2x": outage["p99_ratio_down_over_up"] is not None
            and outage["p99_ratio_down_over_up"] <= 1.2,
            "zero_failed_predictions": outage["failed_predictions"] == 0,
            "buffered_delivered_or_counted": outage["delivered_after_restart"]
            + outage["dropped_counted"]
            >= outage["served_while_down"] - 1,
            "publish_to_swap_le_5_s": all(
                r.get("publish_to_edge_swap_s", 0) <= 5 for r in sites.values()
            ),
        },
    }
