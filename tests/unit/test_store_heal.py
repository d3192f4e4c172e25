"""The traffic store heals itself (real SQLite files, the real writer thread): random bytes over
the file, a truncated file and a deleted -wal under load; a damaged file at open; a reader (the
adaptation worker) that meets a damaged file. Each time: the damaged file is moved aside under
a timestamped name, a fresh store takes its place, the loss is counted and logged once, and
what is written afterwards is kept."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from mp2a.metrics import get_metrics
from online.store import StoreConfig, TrafficStore

DIM = 32


def healed() -> float:
    return get_metrics().state_healed.labels(what="traffic_store")._value.get()


def aside(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name + ".damaged-"))


def fill(store: TrafficStore, x: np.ndarray) -> None:
    for e in x:
        store.offer(e, 1, 0.5, "1")
    assert store.flush(30)


def checkpointed(path: Path) -> int:
    """Everything in the database file itself (what damage to the file can reach)."""
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return path.stat().st_size


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(3000, DIM)).astype(np.float32)


@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
def test_a_damaged_file_under_a_running_writer_is_moved_aside_and_replaced(
    tmp_path, x, damage, caplog
):
    path = tmp_path / "traffic.sqlite"
    store = TrafficStore(StoreConfig(path=path, dim=DIM, check_s=0.2))
    fill(store, x[:2000])
    size = checkpointed(path)
    before = healed()
    with open(path, "r+b") as f:
        if damage == "random bytes":
            f.seek(size // 3)
            f.write(np.random.default_rng(1).bytes(size // 3))
        else:
            f.truncate(size // 2)
    with caplog.at_level(logging.ERROR, logger="mp2a.heal"):
        for e in x[2000:2100]:  # the writer finds the damage (a write, or its check)
            store.offer(e, 1, 0.5, "1")
            time.sleep(0.005)
        assert store.flush(30)
        deadline = time.time() + 30
        while not aside(path):
            assert time.time() < deadline, "the damaged store was never moved aside"
            time.sleep(0.05)
        fill(store, x[2100:2500])  # goes to the fresh store
        lines = [r for r in caplog.records if "is damaged" in r.getMessage()]
    assert healed() == before + 1 and len(lines) == 1, [r.getMessage() for r in lines]
    assert aside(path)[0].name in lines[0].getMessage()
    n = store.count()
    assert 400 <= n <= 500 and store.dropped == 0  # at most the 100 before it was noticed
    assert store.read(limit=400).embeddings.tolist() == x[2100:2500].tolist()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    store.close()


def test_a_deleted_wal_under_load_loses_no_committed_row(tmp_path, x, caplog):
    path = tmp_path / "traffic.sqlite"
    store = TrafficStore(StoreConfig(path=path, dim=DIM))
    fill(store, x[:1000])
    before = healed()
    with caplog.at_level(logging.ERROR, logger="online.store"):
        os.unlink(path.with_name(path.name + "-wal"))  # rows committed only in the WAL
        fill(store, x[1000:1500])
    assert store.count() == 1500 and store.dropped == 0
    assert store.read().embeddings.tolist() == x[:1500].tolist()
    assert healed() == before + 1
    assert len([r for r in caplog.records if "-wal file was deleted" in r.getMessage()]) == 1
    store.close()
    con = sqlite3.connect(path)
    assert con.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 1500
    con.close()


def test_a_damaged_file_is_found_at_open_and_by_a_reader(tmp_path, x):
    path = tmp_path / "traffic.sqlite"
    (path.parent / "traffic.sqlite").write_bytes(b"not a database at all" * 400)
    before = healed()
    store = TrafficStore(StoreConfig(path=path, dim=DIM))  # quick_check at open
    assert healed() == before + 1 and len(aside(path)) == 1
    fill(store, x[:300])
    assert store.count() == 300
    store.close()

    # the adaptation worker's read of a file damaged since it was opened: healed, not a
    # failure for ever (an empty store to adapt on, then new traffic)
    size = checkpointed(path)
    with open(path, "r+b") as f:
        f.seek(size // 4)
        f.write(b"\xff" * (size // 2))
    reader = TrafficStore(StoreConfig(path=path, dim=DIM), start=False)
    assert len(reader.read().embeddings) == 0
    assert healed() == before + 2 and len(aside(path)) == 2
    writer = TrafficStore(StoreConfig(path=path, dim=DIM))
    fill(writer, x[:10])
    assert reader.count() == 10
    writer.close()
