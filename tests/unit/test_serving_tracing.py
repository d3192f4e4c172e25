"""serving.service: the prediction routes make no tracing spans unless BentoML exports them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json
from opentelemetry.instrumentation.asgi import get_host_port_url_tuple
from opentelemetry.util.http import ExcludeList
import serving.service as s
tracing = s.Mp2aService.config.get("tracing", {})
urls = tracing.get("excluded_urls")
paths = ("/predict", "/predict_batch", "/model", "/metrics", "/predictions", "/x/predict/y")
scopes = [{"type": "http", "path": p, "headers": [(b"host", b"10.0.0.5:3000")]} for p in paths]
# the URL the tracing middleware matches (scheme, host, path; no query)
off = [ExcludeList(urls).url_disabled(get_host_port_url_tuple(sc)[2]) for sc in scopes if urls]
print(json.dumps({"tracing": tracing, "off": off}))
"""


def probe(tmp_path, config: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENTOML_CONFIG")}
    if config is not None:
        (tmp_path / "bentoml.yaml").write_text(config)
        env["BENTOML_CONFIG"] = str(tmp_path / "bentoml.yaml")
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_untraced_predictions_without_an_exporter_traced_with_one(tmp_path):
    plain = probe(tmp_path, None)
    assert plain["off"] == [True, True, False, False, False, False]
    exported = probe(tmp_path, "tracing:\n  exporter_type: in_memory\n  sample_rate: 1.0\n")
    assert exported["tracing"] == {}  # BentoML's own settings: every route traced
