"""How many worker processes serve: `MP2A_WORKERS=N`, or `auto` (the default).

Each worker process runs a request's Python — the HTTP layers, decoding, preprocessing, the
head — under its own GIL, so more processes answer more small requests at once; but the
cores are shared, and each process's ONNX Runtime session gets cores/N intra-op threads, so a
model that uses every core for one image answers a lone request more slowly. `auto` measures
which of the two this model is: one image through the exported encoder with one thread and
with every core (the same session settings as serving). When one thread costs a lone request
at most `LONE_COST_MS` more than every core — the model cannot use the cores anyway: a small
model, or one on a GPU — it runs one worker per core (at most `MAX_AUTO`), otherwise one.

Measured on 2 cores (serving/README.md, "Workers"): the tiny CLIP's encoder takes ~0.3 ms an
image with one thread or two, and two workers serve 1.2-1.4x the requests of one at c = 8 and
32 with the same c = 1 latency; ViT-B-16 takes ~2x longer on one thread than on two, and two
workers cost it 40 % at c = 1.

The choice is made once, where the service is defined (BentoML's server process, which starts
the workers), and passed to the workers in their environment, so they all use the same number
and report the same measurement in GET /model.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ENV = "MP2A_WORKERS"
CHOSEN_ENV = "_MP2A_WORKERS_AUTO"  # the arbiter's measurement, for the workers' /model
LONE_COST_MS = 1.0  # the most a lone request may lose to one-thread sessions
MAX_AUTO = 8  # each worker holds its own session and BentoML's ~200 MB: a bound on memory
ROUNDS = 3  # timed calls per thread count (after one warm-up call), the fastest kept
BUDGET_S = 1.0  # ... or fewer once this much time went to them


@dataclass(frozen=True)
class Workers:
    count: int
    chosen: str  # "MP2A_WORKERS" (set by the user) or "auto"
    reason: str
    encoder_ms: dict[str, float] = field(default_factory=dict)  # threads -> ms per image

    def describe(self) -> dict:
        return {
            "count": self.count,
            "chosen": self.chosen,
            "reason": self.reason,
            "encoder_ms_by_threads": self.encoder_ms,
        }

    def to_env(self) -> str:
        return json.dumps(
            {
                "count": self.count,
                "reason": self.reason,
                "encoder_ms": self.encoder_ms,
                "pid": os.getpid(),  # the server process, the workers' parent
            }
        )


def time_encoder(path: Path, image_size: int, threads: int) -> float:
    """Milliseconds for one image through the encoder at `path` with `threads` intra-op
    threads, served settings (no spinning): the fastest of up to ROUNDS calls after a warm-up,
    within about BUDGET_S of timed calls (a large model on CPU stops after one)."""
    from mp2a.runtime import OrtEncoder

    enc = OrtEncoder(path, threads=threads, spin=False)
    x = np.zeros((1, 3, image_size, image_size), np.float32)
    enc(x)
    best, spent = float("inf"), 0.0
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        enc(x)
        took = time.perf_counter() - t0
        best, spent = min(best, took), spent + took
        if spent > BUDGET_S:
            break
    return best * 1000


Measure = Callable[[tuple[int, ...]], list[float]]  # thread counts -> ms per image each


def choose(cores: int, measure: Measure) -> Workers:
    """The auto rule for `cores` CPUs; `measure` times one image at the given thread counts."""
    if cores <= 1:
        return Workers(1, "auto", "one core")
    one, every = measure((1, cores))
    ms = {"1": round(one, 3), str(cores): round(every, 3)}
    if one - every <= LONE_COST_MS:
        n = min(cores, MAX_AUTO)
        why = (
            f"one image takes {one:.2f} ms on 1 thread, {every:.2f} ms on {cores}: the model "
            f"gains little from the cores, so {n} worker processes share them"
        )
        return Workers(n, "auto", why, ms)
    why = (
        f"one image takes {one:.2f} ms on 1 thread, {every:.2f} ms on {cores}: one worker, "
        "its session on every core"
    )
    return Workers(1, "auto", why, ms)


def measure_artifact(run: Path, precision: str) -> Measure:
    """`measure` for the exported encoder the ort backend would serve for `run`. It runs in a
    process of its own, so the server process that chooses keeps neither the sessions' memory
    (~0.3 GB each for ViT-B-16 fp32) nor their threads."""
    from mp2a.artifact import load_artifact
    from serving.backends import encoder_path

    art = load_artifact(run)
    path = encoder_path(art, precision)
    size = art.preprocessing.image_size

    def measure(threads: tuple[int, ...]) -> list[float]:
        cmd = [sys.executable, "-m", "serving.workers", str(path), str(size), *map(str, threads)]
        root = str(Path(__file__).resolve().parent.parent)  # the folder holding serving/
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        }
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"timing {path.name} failed: {last}")
        return [float(v) for v in out.stdout.split()]

    return measure


def requested(env: Mapping[str, str]) -> int | None:
    """The number MP2A_WORKERS sets, or None for auto (unset, empty or `auto`); a ValueError
    that says what to write for anything else."""
    raw = env.get(ENV, "").strip()
    if raw.lower() in ("", "auto"):
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{ENV}={raw!r}: give a whole number of worker processes ≥ 1, or auto")
    return int(raw)


def resolve(env: Mapping[str, str], run: Path, cores: int) -> Workers:
    """The worker count for this server. With `auto`, a worker process started by an `auto`
    server takes the count its server measured (`CHOSEN_ENV`, which the server passes to its
    workers, checked to come from the parent process); anything else measures."""
    given = requested(env)
    if given is not None:
        return Workers(given, ENV, f"{ENV}={given}")
    inherited = _inherited(env.get(CHOSEN_ENV, ""))
    if inherited is not None:
        return inherited
    if env.get("MP2A_BACKEND", "ort") != "ort":
        chosen = Workers(1, "auto", "the torch backend: one worker")
    else:
        try:
            chosen = choose(cores, measure_artifact(run, env.get("MP2A_PRECISION", "fp32")))
        except Exception as e:  # no artifact or encoder yet: the service says what is wrong
            chosen = Workers(1, "auto", f"could not time the encoder ({e})")
    log.info("%s=auto: %d worker process(es); %s", ENV, chosen.count, chosen.reason)
    return chosen


def _inherited(raw: str) -> Workers | None:
    """The choice the parent process made, or None (none passed, or from another process: a
    value baked into an image's environment is measured again, not trusted)."""
    if not raw:
        return None
    try:
        d = json.loads(raw)
        if int(d["pid"]) != os.getppid():
            return None
        return Workers(int(d["count"]), "auto", str(d["reason"]), dict(d["encoder_ms"]))
    except (ValueError, KeyError, TypeError):
        return None


def child_env(chosen: Workers) -> list[dict]:
    """BentoML `envs` that pass an `auto` choice to the worker processes the server starts
    (runtime only: a measurement is never baked into a built image)."""
    if chosen.chosen != "auto":
        return []
    return [{"name": CHOSEN_ENV, "value": chosen.to_env(), "stage": "runtime"}]


if __name__ == "__main__":  # python -m serving.workers ENCODER IMAGE_SIZE THREADS [THREADS...]
    encoder, size = Path(sys.argv[1]), int(sys.argv[2])
    print(*(time_encoder(encoder, size, int(t)) for t in sys.argv[3:]))
