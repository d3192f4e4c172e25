"""The traffic store on real SQLite files: round trip, retention, sampling, concurrency (threads
and processes), a full queue that drops instead of blocking, images only when enabled."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from online.store import StoreConfig, StoreError, TrafficStore, peek_int, read_int

D = 8


def config(path: Path, **kw) -> StoreConfig:
    return StoreConfig(path=path, dim=D, **kw)


def fill(store: TrafficStore, n: int, version: str = "1", start: int = 0) -> np.ndarray:
    """Offer n samples whose embedding encodes their index; returns the (n, D) embeddings."""
    emb = np.arange(start * D, (start + n) * D, dtype=np.float32).reshape(n, D) / 7  # (n, D)
    for i, e in enumerate(emb):
        store.offer(e, (start + i) % 10, 0.5 + ((start + i) % 5) / 10, version)
    return emb


def test_round_trip_of_embeddings_labels_confidences_and_versions(tmp_path):
    store = TrafficStore(config(tmp_path / "t.sqlite"))
    t0 = time.time()
    emb1 = fill(store, 5, "1")
    emb2 = fill(store, 3, "2", start=5)
    store.close()
    got = store.read()
    assert got.embeddings.dtype == np.float32 and got.embeddings.shape == (8, D)
    np.testing.assert_array_equal(got.embeddings, np.concatenate([emb1, emb2]))
    np.testing.assert_array_equal(got.labels, np.arange(8) % 10)
    np.testing.assert_allclose(got.confidences, 0.5 + (np.arange(8) % 5) / 10, rtol=1e-6)
    assert np.all(got.times >= t0 - 1) and np.all(np.diff(got.times) >= 0)
    assert store.versions() == {"1": 5, "2": 3}
    np.testing.assert_array_equal(store.read(version="2").embeddings, emb2)
    newest = store.read(limit=2)  # the newest two, oldest first
    np.testing.assert_array_equal(newest.embeddings, emb2[1:])
    assert len(store.read(since=time.time() + 60).labels) == 0
    assert store.count() == 8


def test_retention_keeps_the_newest_rows(tmp_path):
    store = TrafficStore(config(tmp_path / "t.sqlite", max_rows=10, batch_size=4))
    emb = fill(store, 25)
    store.close()
    assert store.count() == 10
    np.testing.assert_array_equal(store.read().embeddings, emb[-10:])


def test_retention_deletes_rows_past_the_max_age(tmp_path):
    path = tmp_path / "t.sqlite"
    store = TrafficStore(config(path, max_age_s=3600))
    fill(store, 4)
    assert store.flush(timeout=30)
    with sqlite3.connect(path) as con:  # two rows served two hours ago
        con.execute("UPDATE samples SET t = t - 7200 WHERE id <= 2")
    fill(store, 1, start=4)  # the next write runs the retention pass
    store.close()
    assert store.count() == 3
    np.testing.assert_array_equal(store.read().labels, [2, 3, 4])


@pytest.mark.parametrize(("rate", "low", "high"), [(0.0, 0, 0), (1.0, 400, 400), (0.5, 160, 240)])
def test_sampling_rate(tmp_path, rate, low, high):
    store = TrafficStore(config(tmp_path / "t.sqlite", sample_rate=rate, seed=0))
    kept = sum(store.offer(np.ones(D), 1, 0.9, "1") for _ in range(400))
    store.close()
    assert low <= kept <= high
    assert store.count() == kept and store.dropped == 0


def test_concurrent_producers_lose_nothing_the_sampling_keeps(tmp_path):
    store = TrafficStore(config(tmp_path / "t.sqlite", sample_rate=0.7, seed=1, batch_size=16))
    kept = [0] * 8

    def produce(k: int) -> None:
        for i in range(250):
            kept[k] += store.offer(np.full(D, k * 1000 + i, np.float32), k, 0.5, "1")

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    got = store.read()
    assert store.dropped == 0 and 0 < sum(kept) < 2000
    assert len(got.labels) == sum(kept)
    assert np.bincount(got.labels, minlength=8).tolist() == kept
    assert len(np.unique(got.embeddings[:, 0])) == sum(kept)  # each sample once


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path):
    store = TrafficStore(config(tmp_path / "t.sqlite", queue_size=4), start=False)
    assert all(store.offer(np.ones(D), 1, 0.9, "1") for _ in range(4))
    assert not store.alive
    # the writer is not running: a blocking put would hang here forever
    assert store.offer(np.ones(D), 1, 0.9, "1") is False
    assert store.offer(np.ones(D), 1, 0.9, "1") is False
    assert store.dropped == 2
    store.close()  # starts the writer, which writes what was queued
    assert store.count() == 4 and store.dropped == 2


def test_raw_images_only_when_enabled(tmp_path):
    off = TrafficStore(config(tmp_path / "off.sqlite"))
    off.offer(np.ones(D), 1, 0.9, "1", image=b"\x89PNG secret")
    off.close()
    assert off.count() == 1 and off.image_count() == 0

    on = TrafficStore(config(tmp_path / "on.sqlite", store_images=True, max_images=3))
    for i in range(5):
        on.offer(np.ones(D), 1, 0.9, "1", image=b"img%d" % i)
    on.close()
    assert on.count() == 5 and on.image_count() == 3  # images have their own cap
    with sqlite3.connect(tmp_path / "on.sqlite") as con:
        kept = [r[0] for r in con.execute("SELECT data FROM images ORDER BY sample_id")]
    assert kept == [b"img2", b"img3", b"img4"]


def test_rows_leaving_the_store_take_their_image_along(tmp_path):
    store = TrafficStore(config(tmp_path / "t.sqlite", store_images=True, max_rows=2))
    for i in range(4):
        store.offer(np.ones(D), 1, 0.9, "1", image=b"img%d" % i)
    store.close()
    assert store.count() == 2 and store.image_count() == 2


def test_a_store_of_other_embeddings_is_refused(tmp_path):
    TrafficStore(config(tmp_path / "t.sqlite")).close()
    with pytest.raises(StoreError, match="8-d embeddings but this model makes 16-d"):
        TrafficStore(StoreConfig(path=tmp_path / "t.sqlite", dim=16))


def test_configuration_from_the_environment(tmp_path):
    assert StoreConfig.from_env(tmp_path, D, {"MP2A_STORE": "off"}) is None
    c = StoreConfig.from_env(tmp_path, D, {})
    assert c is not None and c.path == tmp_path / "traffic.sqlite"
    assert (c.sample_rate, c.max_rows, c.max_age_s, c.store_images) == (1.0, 100_000, 604800, False)
    env = {
        "MP2A_STORE": str(tmp_path / "x.db"),
        "MP2A_SAMPLE_RATE": "0.25",
        "MP2A_STORE_MAX_ROWS": "50",
        "MP2A_STORE_MAX_AGE_S": "60",
        "MP2A_STORE_IMAGES": "1",
        "MP2A_STORE_MAX_IMAGES": "7",
    }
    c = StoreConfig.from_env(tmp_path, D, env)
    assert c is not None and c.path == tmp_path / "x.db"
    assert (c.sample_rate, c.max_rows, c.max_age_s, c.store_images, c.max_images) == (
        0.25,
        50,
        60.0,
        True,
        7,
    )
    with pytest.raises(ValueError, match="MP2A_SAMPLE_RATE='lots'"):
        StoreConfig.from_env(tmp_path, D, {"MP2A_SAMPLE_RATE": "lots"})
    with pytest.raises(ValueError, match=r"sample_rate must be in \[0, 1\]"):
        StoreConfig.from_env(tmp_path, D, {"MP2A_SAMPLE_RATE": "2"})


def _write_from_process(path: str, k: int, n: int, go) -> None:
    store = TrafficStore(StoreConfig(path=Path(path), dim=D, batch_size=8))
    go.wait(60)
    for i in range(n):
        store.offer(np.full(D, k * 10_000 + i, np.float32), k, 0.5, f"p{k}")
    store.close()


def test_two_processes_writing_one_file_lose_nothing(tmp_path):
    path = tmp_path / "t.sqlite"
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_write_from_process, args=(str(path), k, 300, go)) for k in (0, 1)]
    for p in procs:
        p.start()
    go.set()  # both write at the same time
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    reader = TrafficStore(StoreConfig(path=path, dim=D), start=False)
    assert reader.versions() == {"p0": 300, "p1": 300}
    assert len(np.unique(reader.read().embeddings[:, 0])) == 600


def test_peek_int_reads_zero_until_the_store_exists_and_then_the_rows(tmp_path):
    path = tmp_path / "t.sqlite"
    rows = "SELECT COUNT(*) FROM samples"
    assert peek_int(path, rows) == 0 and not path.exists()  # never creates the file
    store = TrafficStore(StoreConfig(path=path, dim=4))
    for i in range(3):
        store.offer(np.ones(4, np.float32), i, 0.5, "1")
    store.close()
    assert peek_int(path, rows) == read_int(path, rows) == 3
    assert peek_int(path, "SELECT COUNT(*) FROM no_such_table") == 0
    with pytest.raises(sqlite3.OperationalError):
        read_int(path, "SELECT COUNT(*) FROM no_such_table")
