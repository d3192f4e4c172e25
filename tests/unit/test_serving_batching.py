"""serving.batching: concurrent requests share model calls and get their own rows back."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving.batching import MicroBatcher


class SlowModel:
    """Row-wise function whose output identifies its input; records every batch size."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.sizes: list[int] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.sizes.append(len(x))
        time.sleep(self.delay)  # the model is busy; requests pile up behind it
        return np.stack([x[:, 0] * 2, x[:, 0] + 1], axis=1)  # (B, 2)


def test_concurrent_requests_get_their_own_answers_in_shared_batches():
    model = SlowModel()
    b = MicroBatcher(model, max_batch=8, max_wait_s=0.01)
    n_rows = {i: 1 + i % 3 for i in range(60)}  # requests of 1, 2 or 3 rows

    def request(i: int) -> tuple[int, np.ndarray]:
        x = np.full((n_rows[i], 4), float(i), np.float32)
        y, seconds = b.submit(x)
        assert seconds > 0
        return i, y

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(request, range(60)))
    b.close()
    for i, y in results:
        assert y.shape == (n_rows[i], 2)
        np.testing.assert_array_equal(y, [[2 * i, i + 1]] * n_rows[i])
    assert sum(model.sizes) == sum(n_rows.values())
    assert max(model.sizes) > 1, "requests waiting together must share a model call"
    assert max(model.sizes) <= 8


def test_lone_request_does_not_wait_for_company():
    b = MicroBatcher(lambda x: x, max_batch=32, max_wait_s=2.0)
    b.submit(np.zeros((1, 1)))
    t0 = time.perf_counter()
    b.submit(np.zeros((1, 1)))
    assert time.perf_counter() - t0 < 0.5
    b.close()


def test_arriving_requests_are_waited_for():
    model = SlowModel(delay=0.0)
    b = MicroBatcher(model, max_batch=8, max_wait_s=1.0)
    started = threading.Event()

    def slow_decoder() -> None:
        with b.arriving():
            started.set()
            time.sleep(0.1)  # still decoding when the first request reaches the model
        b.submit(np.ones((1, 4), np.float32))

    t = threading.Thread(target=slow_decoder)
    t.start()
    started.wait()
    b.submit(np.zeros((1, 4), np.float32))
    t.join()
    b.close()
    assert model.sizes == [2]


def test_oversize_request_runs_alone_and_is_never_split():
    model = SlowModel(delay=0.0)
    b = MicroBatcher(model, max_batch=4)
    y, _ = b.submit(np.arange(10, dtype=np.float32)[:, None].repeat(2, 1))
    b.close()
    assert model.sizes == [10] and y.shape == (10, 2)


def test_model_failure_reaches_every_request_and_the_batcher_survives():
    calls = {"n": 0}

    def flaky(x: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return x

    b = MicroBatcher(flaky, max_batch=4)
    with pytest.raises(RuntimeError, match="device lost"):
        b.submit(np.zeros((1, 1)))
    y, _ = b.submit(np.ones((1, 1)))
    assert y[0, 0] == 1 and b.alive
    b.close()
    assert not b.alive
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(np.ones((1, 1)))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(lambda x: x, max_batch=0)
    with pytest.raises(ValueError, match="max_wait_s"):
        MicroBatcher(lambda x: x, max_wait_s=-1)


def test_a_lone_request_runs_the_model_in_its_own_thread():
    """Idle model, nothing queued, nobody decoding: no hand-off to the model thread; while a
    call runs, a second request queues for the model thread as before."""
    threads: list[str] = []

    def model(x: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread().name)
        time.sleep(0.05)
        return x * 2

    b = MicroBatcher(model, max_batch=8, max_wait_s=0.0, name="model-thread")
    y, _ = b.submit(np.ones((1, 3), np.float32))
    np.testing.assert_array_equal(y, 2 * np.ones((1, 3)))
    assert threads == [threading.current_thread().name]
    with ThreadPoolExecutor(2) as pool:  # the second finds the model busy
        first = pool.submit(b.submit, np.full((1, 3), 1.0, np.float32))
        time.sleep(0.01)
        second = pool.submit(b.submit, np.full((1, 3), 5.0, np.float32))
        assert first.result()[0][0, 0] == 2 and second.result()[0][0, 0] == 10
    b.close()
    assert threads[1] != "model-thread" and threads[2] == "model-thread"
