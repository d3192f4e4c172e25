"""What the torch-free image (`Dockerfile`) can import: the distributions its `pip install`
line names, their requirements (transitively, as installed here) and the top-level modules
those provide, plus the standard library and the project's own packages. The edge-mode test
runs the server with every other import refused, so a package the service needs but the
image lacks fails a test here rather than the first `docker run`."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("mp2a", "online", "serving")
# the same module from another build: the image's CPU ONNX Runtime, this venv's GPU one
SAME_MODULE = {"onnxruntime": "onnxruntime-gpu"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(dockerfile: Path = ROOT / "Dockerfile") -> list[Requirement]:
    """The requirements of the image's `pip install` line (the CPU ONNX Runtime)."""
    text = dockerfile.read_text()
    block = re.search(r"^RUN python3 -m pip install((?:.*\\\n)*.*)$", text, re.M)
    assert block is not None, "the Dockerfile has no `RUN python3 -m pip install` line"
    specs = re.findall(r'"([^"]+)"', block.group(1))
    return [Requirement(s.replace("${ORT_PACKAGE}", "onnxruntime")) for s in specs]


def installed_closure(reqs: list[Requirement]) -> set[str]:
    """The canonical names of the distributions pip would install for `reqs` (no extras)."""
    seen: set[str] = set()
    todo = [r.name for r in reqs]
    while todo:
        name = _canonical(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if name in SAME_MODULE:
                todo.append(SAME_MODULE[name])
            continue  # not installed here, so not importable here either
        seen.add(name)
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def image_modules() -> set[str]:
    """Top-level module names the image's third-party packages provide."""
    dists = installed_closure(pinned())
    return {
        module
        for module, names in metadata.packages_distributions().items()
        if any(_canonical(n) in dists for n in names)
    }
