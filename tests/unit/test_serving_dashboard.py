"""The Grafana dashboard: valid JSON, documented panels, real metric names, valid PromQL."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from prereqs import require_binary  # tests/ (pytest's path)

from mp2a.metrics import NAMES

DASHBOARD = Path(__file__).resolve().parents[2] / "serving" / "grafana_dashboard.json"


def exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def test_panels_are_described_and_use_existing_metrics():
    dash = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in dash["panels"]]
    assert len(titles) == len(set(titles)) >= 8
    assert all(p["description"] and p["targets"] for p in dash["panels"])
    readme = (DASHBOARD.parent / "README.md").read_text()
    assert all(f"**{t}**" in readme for t in titles), "every panel is described in README"
    used = {m for e in exprs() for m in re.findall(r"\b(mp2a_\w+)", e)}
    base = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    assert base <= set(NAMES), base - set(NAMES)
    assert {"mp2a_inference_latency_seconds", "mp2a_adaptation_runs_total"} <= base


def test_every_query_is_valid_promql(tmp_path):
    promtool = require_binary("promtool", "prometheus")
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, e in enumerate(exprs()):
        e = e.replace("$__rate_interval", "1m").replace("$job", ".*")
        lines += [f"      - record: dashboard:query{i}", f"        expr: {json.dumps(e)}"]
    rules = tmp_path / "rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    out = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
