"""A light replica: what a `mp2a serve` replica with MP2A_ONLINE=1 does with PostgreSQL, in
one small process, without a model (`python -m benchmarks.replica RUN --stats FILE`).

It runs the real pieces on the real state client (online/pg.py, from MP2A_STATE,
MP2A_STATE_DIRECT, MP2A_STATE_LISTEN, MP2A_STATE_CACHE): the traffic store's writer fed with
synthetic sampled traffic (random unit embeddings at `--rate` per second, through
`TrafficStore.offer` and MP2A_SAMPLE_RATE like served images), the version watcher
(online/swap.py) swapping a stand-in predictor that only records which version it serves and
since when, and the adaptation worker's loop (online/worker.py `loop`, on a state of its own
as in its own process) that takes the lead and answers requests (none are sent: no training).
Each half second it writes its figures to `--stats` (JSON, atomically); SIGTERM flushes the
store and writes them a last time. `mp2a bench fleet --replicas N` starts N of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

# the confidence of every synthetic sample: tells a light replica's rows from a full server's
CONFIDENCE = 0.9


class StandIn:
    """The predictor the watcher drives: the version served and when each one arrived."""

    def __init__(self, version: int) -> None:
        self.version = str(version)
        self.arrived: dict[str, float] = {self.version: time.time()}

    def swap(self, art) -> None:
        self.version = str(art.version)
        self.arrived.setdefault(self.version, time.time())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.replica", description=__doc__)
    p.add_argument("run", type=Path)
    p.add_argument("--stats", type=Path, required=True)
    p.add_argument("--rate", type=float, default=20.0, help="served samples per second")
    p.add_argument("--no-worker", action="store_true", help="no adaptation worker loop")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    from online import worker
    from online.state import StateError, open_state
    from online.swap import VersionWatcher

    env = dict(os.environ)
    try:
        state = open_state(a.run, env)
        wstate = None if a.no_worker else open_state(a.run, env)
    except StateError as e:
        print(f"replica: {e}", file=sys.stderr)
        return 2
    dim = state.base.backbone.embed_dim
    store = state.open_store(dim)
    predictor = StandIn(state.load_current().version)
    watcher = VersionWatcher(state, predictor).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    offered = queued = 0

    if wstate is not None:
        threading.Thread(
            target=worker.loop, args=(wstate,), kwargs={"poll": 1.0}, daemon=True
        ).start()

    def figures(final: bool = False) -> dict:
        lead = wstate is not None and getattr(wstate, "_lead", None) is not None
        return {
            "pid": os.getpid(),
            "ready": True,
            "final": final,
            "version": predictor.version,
            "arrived": predictor.arrived,
            "healthy": watcher.healthy,
            "leading": lead,
            "offered": offered,
            "queued": queued,
            "dropped": store.dropped,
            "committed": store.committed,
            "t": time.time(),
        }

    def write(final: bool = False) -> None:
        tmp = a.stats.with_suffix(".tmp")
        tmp.write_text(json.dumps(figures(final)))
        os.replace(tmp, a.stats)

    rng = np.random.default_rng(os.getpid())
    tick, last_write = 0.1, 0.0
    while not stop.is_set():
        t0 = time.monotonic()
        n = int(rng.poisson(a.rate * tick))
        if n:
            x = rng.normal(size=(n, dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            for e in x:  # (D,) one served image's embedding
                offered += 1
                queued += store.offer(e, int(rng.integers(10)), CONFIDENCE, predictor.version)
        if t0 - last_write >= 0.5:
            write()
            last_write = t0
        stop.wait(max(0.0, tick - (time.monotonic() - t0)))
    watcher.close()
    store.flush(60)
    store.close()
    write(final=True)
    state.close()
    if wstate is not None:
        wstate.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
