"""Worker threads for sync functions.

Unlike `ThreadPoolExecutor`, the threads get a 4 MiB stack instead of the default 8 MiB
(an instance runs under RLIMIT_AS = its memory, and every stack reserves address space),
a thread that cannot be started only lowers the concurrency instead of failing the call,
and the threads are daemons: a call that timed out and never returns does not keep the
process from exiting. Such a call holds its thread for good; once every thread is held so, the
pool is `stuck` (nothing can run any more) and the instance says so on /healthz.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any

STACK_SIZE = 4 * 1024 * 1024  # 2 MiB is enough for the default recursion limit; twice that


class NoWorkerError(RuntimeError):
    """Not a single worker thread can be started (the memory limit is too low)."""


_Job = tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]]


class WorkerPool:
    """Up to `max_workers` threads, started when a call finds none idle."""

    def __init__(self, max_workers: int, name: str = "lambdabus-function") -> None:
        self.max_workers = max_workers
        self.name = name
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._workers = 0
        self._capped = False  # a thread could not be started: the pool stays this size
        self._abandoned: set[concurrent.futures.Future[Any]] = set()

    @property
    def workers(self) -> int:
        return self._workers

    @property
    def size(self) -> int:
        """How many threads the pool may have."""
        return self._workers if self._capped else self.max_workers

    @property
    def stuck(self) -> bool:
        """Every thread the pool may have runs a call nobody waits for any more."""
        return self.size > 0 and len(self._abandoned) >= self.size

    def abandon(self, future: concurrent.futures.Future[Any]) -> None:
        """The caller gave up on a running call (it timed out): its thread is held until the
        call returns, if ever. A call still queued is cancelled instead and never runs."""
        if future.cancel() or future.done():
            return
        self._abandoned.add(future)
        future.add_done_callback(self._abandoned.discard)

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """Queue `fn(*args)`; call from one thread only (the event loop's)."""
        if not self._idle.acquire(blocking=False) and self._workers < self.max_workers:
            self._start_worker()
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((future, fn, args))
        return future

    def _start_worker(self) -> None:
        thread = threading.Thread(
            target=self._work, name=f"{self.name}-{self._workers}", daemon=True
        )
        previous = threading.stack_size(STACK_SIZE)
        try:
            thread.start()
        except RuntimeError:  # "can't start new thread": out of address space or threads
            if self._workers == 0:
                raise NoWorkerError("no worker thread can be started for a sync function") from None
            self._capped = True
            return
        finally:
            threading.stack_size(previous)
        self._workers += 1

    def _work(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            if future.set_running_or_notify_cancel():  # False: timed out while queued
                try:
                    result = fn(*args)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
                    del result
            del future, fn, args  # do not hold the last request while idle
            self._idle.release()
