"""Dynamic micro-batching: requests that wait together are decided together.

A scoring decision is a few store round trips (consent ledger, online store) and a model call,
each with a fixed cost per call that dwarfs the work per payment. Under load, requests queue
anyway; a `MicroBatcher` hands whatever is waiting (up to ``max_batch``) to one worker-thread call,
so the batch shares one ledger query, one Redis pipeline and one LightGBM call. With no queue
(light load) a batch is a single request, and its latency is what it was without batching.

Each item gets its own result or its own exception: one bad payment never fails its neighbours.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")

#: What a batch function returns for each item, in order: its result or the exception it raised.
BatchFunc = Callable[[list[In]], Sequence[Out | BaseException]]


@dataclass
class _Waiting(Generic[In, Out]):
    item: In
    done: asyncio.Future[Out]


class MicroBatcher(Generic[In, Out]):
    """Run ``func`` on batches of submitted items in ``workers`` threads (each takes one batch
    at a time); `submit` returns the item's own result."""

    def __init__(
        self,
        func: BatchFunc[In, Out],
        workers: int,
        max_batch: int,
        name: str,
        on_batch: Callable[[int], object] | None = None,
    ) -> None:
        if workers < 1 or max_batch < 1:
            raise ValueError("workers and max_batch must be at least 1")
        self.func = func
        self.workers = workers
        self.max_batch = max_batch
        self.name = name
        self.on_batch = on_batch  # told each batch's size (a metric)
        self.batches = 0  # how many batches ran, and how many items they held (mean batch size)
        self.items = 0
        self._queue: asyncio.Queue[_Waiting[In, Out]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: ThreadPoolExecutor | None = None

    async def submit(self, item: In) -> Out:
        loop = asyncio.get_running_loop()
        if self._queue is None or self._loop is not loop or any(t.done() for t in self._tasks):
            self._start(loop)
        assert self._queue is not None
        done: asyncio.Future[Out] = loop.create_future()
        self._queue.put_nowait(_Waiting(item, done))  # unbounded: admission is the rate limiter's job
        return await done

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Workers for this event loop (tests may run the app on several loops in turn)."""
        for task in self._tasks:
            task.cancel()
        self._loop = loop
        queue: asyncio.Queue[_Waiting[In, Out]] = asyncio.Queue()
        self._queue = queue
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, self.name)
        self._tasks = [
            asyncio.create_task(self._work(queue), name=f"{self.name}-{i}") for i in range(self.workers)
        ]

    async def _work(self, queue: asyncio.Queue[_Waiting[In, Out]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                assert self._pool is not None
                results = await loop.run_in_executor(self._pool, self.func, [w.item for w in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} items")
            except BaseException as exc:  # the whole call failed: every waiting request hears it
                for w in batch:
                    if not w.done.done():
                        w.done.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
                if not isinstance(exc, Exception):
                    raise
            else:
                self.batches += 1
                self.items += len(batch)
                for w, r in zip(batch, results, strict=True):
                    if w.done.done():  # the client went away
                        continue
                    if isinstance(r, BaseException):
                        w.done.set_exception(r)
                    else:
                        w.done.set_result(r)
            finally:
                for _ in batch:
                    queue.task_done()

    async def close(self) -> None:
        """Decide everything already queued, then stop the workers and their threads."""
        if self._queue is not None and self._tasks and not all(t.done() for t in self._tasks):
            await self._queue.join()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        self._queue = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.get_running_loop().run_in_executor(None, pool.shutdown, True)
