"""Adaptive micro-batching of the model call, shared by the request threads of one worker.

Each request decodes and preprocesses its own image in its own thread, then hands its pixel
rows to `MicroBatcher.submit` and blocks. One model thread takes whatever is queued (up to
`max_batch` rows), runs the encoder once on the stacked rows and hands each request back its
own slice. The batch grows by itself under load: requests that arrive while the model runs
are queued and go in the next call. When nothing is queued the model thread waits at most
`max_wait_s`, and only if some request has announced itself and is still decoding, so a lone
request never waits for company that is not coming.

A request that finds the model idle, nothing queued and no other request decoding runs the
model call in its own thread: there is no batch to form, and the two thread hand-offs (to
the model thread and back) were the largest cost a lone request paid over a bare server
(py-spy at c=1, serving/README.md). The model still runs one call at a time.

BentoML's own adaptive batching (`@bentoml.api(batchable=True)`) batches HTTP calls of an
API; reaching it from inside a request means an in-process HTTP round trip with the pixel
tensor serialised to JSON, which costs more than the model for a 224 px image.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class _Item:
    rows: np.ndarray  # (n, ...) this request's inputs
    future: Future = field(default_factory=Future)  # -> (outputs (n, ...), model seconds)


BatchHook = Callable[[int, float], None]  # (batch rows, model seconds), e.g. for metrics


class MicroBatcher:
    """Thread-safe: `submit(rows)` from any thread returns `fn` applied to those rows."""

    def __init__(
        self,
        fn: Callable[[np.ndarray], np.ndarray],
        max_batch: int = 32,
        max_wait_s: float = 0.005,
        on_batch: BatchHook | None = None,
        name: str = "mp2a-batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._carry: _Item | None = None  # an item that did not fit the previous batch
        self._arriving = 0
        self._lock = threading.Lock()
        self._busy = threading.Lock()  # held while a model call runs, by whichever thread
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """True while the model thread is running and accepting work."""
        return self._thread.is_alive() and not self._closed

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Wrap a request's decode/preprocess: the model thread may wait briefly for it."""
        with self._lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._lock:
                self._arriving -= 1

    def submit(self, rows: np.ndarray, timeout: float | None = None) -> tuple[np.ndarray, float]:
        """Run the model on `rows` (n, ...) within a shared batch: (outputs (n, ...), seconds of
        the model call the rows rode in)."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        if len(rows) <= self.max_batch and self._busy.acquire(blocking=False):
            try:  # the model is idle: alone, run it here
                if self._arriving == 0 and self._carry is None and self._queue.empty():
                    return self._call(rows)
            finally:
                self._busy.release()
        item = _Item(rows)
        self._queue.put(item)
        return item.future.result(timeout=timeout)

    def close(self) -> None:
        """Finish the batch in progress, fail anything still queued, stop the model thread."""
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout=10)

    def _get(self, timeout: float | None) -> _Item | None:
        """The next queued item; None when none came within `timeout` (0: do not wait)."""
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        try:
            if timeout is not None and timeout <= 0:
                return self._queue.get_nowait()
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _gather(self, first: _Item) -> tuple[list[_Item], bool]:
        """Rows to run now, and whether the stop sentinel was seen."""
        batch, rows = [first], len(first.rows)
        deadline = time.perf_counter() + self.max_wait_s
        while rows < self.max_batch:
            item = self._get(0)
            if item is None:
                left = deadline - time.perf_counter()
                if left <= 0 or self._arriving == 0:
                    break
                item = self._get(left)
                if item is None:
                    break
            if item is _STOP:
                return batch, True
            if rows + len(item.rows) > self.max_batch:
                self._carry = item  # never split a request; it heads the next batch
                break
            batch.append(item)
            rows += len(item.rows)
        return batch, False

    def _call(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """One model call on (B, ...) rows; the caller holds `_busy`."""
        t0 = time.perf_counter()
        y = self.fn(x)  # (B, ...)
        seconds = time.perf_counter() - t0
        if self.on_batch is not None:
            self.on_batch(len(x), seconds)
        return y, seconds

    def _run(self, batch: list[_Item]) -> None:
        try:
            x = np.concatenate([it.rows for it in batch])  # (B, ...)
            y, seconds = self._call(x)
        except BaseException as e:  # hand the failure to every waiting request
            log.exception("model call failed on a batch of %d", sum(len(i.rows) for i in batch))
            for it in batch:
                it.future.set_exception(e)
            return
        start = 0
        for it in batch:
            n = len(it.rows)
            it.future.set_result((y[start : start + n], seconds))
            start += n

    def _loop(self) -> None:
        while True:
            first = self._get(None)
            if first is None or first is _STOP:
                break
            with self._busy:  # from the first item on: a lone submitter queues behind us
                batch, stop = self._gather(first)
                self._run(batch)
            if stop:
                break
        while (left := self._get(0)) is not None:  # nothing will run these any more
            if left is not _STOP:
                left.future.set_exception(RuntimeError("the batcher is closed"))


_STOP = _Item(np.empty((0,), np.float32))  # queued by close()
