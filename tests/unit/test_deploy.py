"""The deployment files a user reaches for (deploy/, Dockerfile, bentofile.yaml) parse, and
name only commands, flags, environment variables, routes and files that exist. They cannot
be run here (no Docker engine, no cluster), so this is what keeps them honest."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from image_env import pinned  # tests/ (pytest's path)
from packaging.requirements import Requirement

from mp2a.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CODE = ("mp2a", "adapt", "export", "online", "serving", "benchmarks")


def env_vars_read_by_the_code() -> set[str]:
    found: set[str] = set()
    for pkg in CODE:
        for f in (ROOT / pkg).rglob("*.py"):
            found |= set(re.findall(r"\"(MP2A_[A-Z0-9_]+)\"", f.read_text()))
    return found


def service_routes() -> set[str]:
    from serving.service import Mp2aService

    return set(Mp2aService.openapi_spec.asdict()["paths"])


def check_command(cmd: list[str]) -> None:
    """`mp2a …` parses with the real CLI parser; `python -m X` names a real module."""
    if cmd[0] == "mp2a":
        build_parser().parse_args(cmd[1:])  # SystemExit on an unknown flag or sub-command
    elif cmd[:3] in (["python3", "-m", "mp2a"], ["python", "-m", "mp2a"]):
        build_parser().parse_args(cmd[3:])
    elif cmd[:2] == ["python3", "-m"] or cmd[:2] == ["python", "-m"]:
        module = cmd[2]
        if module != "bentoml":
            assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
        else:
            target = cmd[cmd.index("serve") + 1]
            path, _, attr = target.partition(":")
            assert (ROOT / (path.replace(".", "/") + ".py")).is_file(), target
            assert f"class {attr}" in (ROOT / (path.replace(".", "/") + ".py")).read_text()
    else:
        raise AssertionError(f"unexpected command {cmd}")


def probe_paths(obj: object) -> list[str]:
    """Every HTTP path a probe, healthcheck or scrape config names."""
    text = yaml.safe_dump(obj) if not isinstance(obj, str) else obj
    return re.findall(r"(?:127\.0\.0\.1:3000|path: )(/[a-z/]+)", text)


def test_compose_parses_and_names_only_what_exists():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "replica-1", "replica-2", "prometheus", "grafana"} <= set(services)
    known = env_vars_read_by_the_code()
    routes = service_routes()
    for name in ("replica-1", "replica-2"):
        s = services[name]
        check_command(s["command"])
        env = s["environment"]
        assert set(env) <= known, set(env) - known
        assert env["MP2A_ONLINE"] == "1" and env["MP2A_STATE"].startswith("postgresql://")
        assert s["depends_on"]["postgres"]["condition"] == "service_healthy"
        for path in probe_paths(" ".join(s["healthcheck"]["test"])):
            assert path in routes, path
        dockerfile = ROOT / s["build"]["context"].replace("..", ".") / s["build"]["dockerfile"]
        assert dockerfile.is_file()
    # the edge: the torch-free image, a site of the hubs' tokens, pointed at a replica
    edge = services["edge-store-1"]
    check_command(edge["command"])
    assert set(edge["environment"]) <= known and "MP2A_ONLINE" not in edge["environment"]
    assert (ROOT / edge["build"]["dockerfile"]).is_file() and edge["build"][
        "dockerfile"
    ] == "Dockerfile"
    args = build_parser().parse_args(edge["command"][3:])
    assert args.hub.removeprefix("http://").split(":")[0] in services
    assert services["replica-1"]["environment"]["MP2A_EDGE_TOKENS"].startswith(f"{args.site}=")
    for volume in services["grafana"]["volumes"]:
        src = volume.split(":")[0]
        assert (DEPLOY / src).resolve().is_file(), src
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] in routes
    assert set(job["static_configs"][0]["targets"]) == {"replica-1:3000", "replica-2:3000"}
    for job in prom["scrape_configs"][1:]:
        assert job["metrics_path"] in routes
        assert {t.split(":")[0] for t in job["static_configs"][0]["targets"]} <= set(services)
    provider = yaml.safe_load((DEPLOY / "grafana" / "dashboards.yml").read_text())
    mounted = [v.split(":")[1] for v in services["grafana"]["volumes"] if "dashboard.json" in v]
    assert Path(mounted[0]).parent == Path(provider["providers"][0]["options"]["path"])


def test_kubernetes_example_parses_and_names_only_what_exists():
    docs = {}
    for f in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            docs[doc["kind"]] = doc
    assert {"Deployment", "Service", "Secret"} <= set(docs)
    known = env_vars_read_by_the_code()
    routes = service_routes()
    (c,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    check_command(c["command"])
    names = {e["name"] for e in c["env"]}
    assert names <= known, names - known
    secret_keys = set(docs["Secret"]["stringData"])
    for e in c["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == docs["Secret"]["metadata"]["name"] and ref["key"] in secret_keys
    assert secret_keys <= known
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" in routes
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez" in routes
    labels = docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert docs["Service"]["spec"]["selector"] == labels


@pytest.mark.parametrize("name", ["Dockerfile", "deploy/Dockerfile.online"])
def test_dockerfiles_copy_folders_that_exist_and_run_real_commands(name):
    text = (ROOT / name).read_text()
    known = env_vars_read_by_the_code()
    for line in text.splitlines():
        if line.startswith("COPY "):
            parts = [p for p in shlex.split(line)[1:] if not p.startswith("--")]
            for src in parts[:-1]:
                assert (ROOT / src).exists() or src.startswith("runs/"), (name, src)
    cmd = re.search(r"^CMD (\[.*?\])", text, re.M | re.S)
    assert cmd is not None
    check_command(yaml.safe_load(cmd.group(1).replace("\\\n", " ")))
    for var in re.findall(r"\b(MP2A_[A-Z0-9_]+)=", text):
        assert var in known, var
    for path in probe_paths(text):
        assert path in service_routes(), path
    # the torch-free image ships every package the service imports
    if name == "Dockerfile":
        for pkg in ("mp2a", "online", "serving"):
            assert f"COPY --chown=mp2a:mp2a {pkg}/ {pkg}/" in text, pkg


def test_bentofile_includes_what_the_service_imports():
    bento = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert bento["service"] == "serving.service:Mp2aService"
    for pkg in ("mp2a", "online", "serving"):
        assert f"{pkg}/*.py" in bento["include"], pkg
    # the same packages as the torch-free Dockerfile (which the edge-mode test runs against)
    assert {str(r) for r in pinned()} == {str(Requirement(p)) for p in bento["python"]["packages"]}
    mp2a_vars = {e["name"] for e in bento["envs"] if e["name"].startswith("MP2A_")}
    assert mp2a_vars <= env_vars_read_by_the_code()
