"""Dynamic micro-batching: requests that wait together are decided together.

A scoring decision is a few store round trips (consent ledger, online store) and a model call,
each with a fixed cost per call that dwarfs the work per payment. Under load, requests queue
anyway; a `MicroBatcher` hands whatever is waiting (up to ``max_batch``) to one worker-thread call,
so the batch shares one ledger query, one Redis pipeline and one LightGBM call. With no queue
(light load) a batch is a single request, and its latency is what it was without batching.

Each item gets its own result or its own exception: one bad payment never fails its neighbours.

An optional second stage (``finish``, the decision log's commit) runs in a thread of its own: while
batch *k* waits for its commit, batch *k+1* is already being decided. A batch's answers leave only
after its own ``finish`` returned, and at most ``finish_depth`` batches wait for it at a time.
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
#: The second stage: takes the first stage's results, returns what each request finally gets.
FinishFunc = Callable[[list[Out | BaseException]], Sequence[Out | BaseException]]


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
        finish: FinishFunc[Out] | None = None,
        finish_depth: int = 2,
    ) -> None:
        if workers < 1 or max_batch < 1 or finish_depth < 1:
            raise ValueError("workers, max_batch and finish_depth must be at least 1")
        self.func = func
        self.finish = finish
        self.finish_depth = finish_depth
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
        self._finish_pool: ThreadPoolExecutor | None = None
        self._finishing: set[asyncio.Task[None]] = set()
        self._slots: asyncio.Semaphore | None = None

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
        if self.finish is not None and self._finish_pool is None:
            self._finish_pool = ThreadPoolExecutor(1, f"{self.name}-finish")
        self._slots = asyncio.Semaphore(self.finish_depth)
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
                self._fail(batch, exc, queue)
                if not isinstance(exc, Exception):
                    raise
                continue
            if self.finish is None:
                self._deliver(batch, results, queue)
                continue
            assert self._slots is not None
            await self._slots.acquire()  # at most finish_depth batches wait for their commit
            task = loop.create_task(self._finish_then_deliver(batch, list(results), queue, self._slots))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)

    async def _finish_then_deliver(
        self,
        batch: list[_Waiting[In, Out]],
        results: list[Out | BaseException],
        queue: asyncio.Queue[_Waiting[In, Out]],
        slots: asyncio.Semaphore,
    ) -> None:
        try:
            assert self.finish is not None and self._finish_pool is not None
            final = await asyncio.get_running_loop().run_in_executor(self._finish_pool, self.finish, results)
            if len(final) != len(batch):
                raise RuntimeError(f"{self.name}: {len(final)} results for {len(batch)} items")
        except BaseException as exc:
            self._fail(batch, exc, queue)
            if not isinstance(exc, Exception):
                raise
        else:
            self._deliver(batch, final, queue)
        finally:
            slots.release()

    def _fail(
        self, batch: list[_Waiting[In, Out]], exc: BaseException, queue: asyncio.Queue[_Waiting[In, Out]]
    ) -> None:
        for w in batch:
            if not w.done.done():
                w.done.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
            queue.task_done()

    def _deliver(
        self,
        batch: list[_Waiting[In, Out]],
        results: Sequence[Out | BaseException],
        queue: asyncio.Queue[_Waiting[In, Out]],
    ) -> None:
        self.batches += 1
        self.items += len(batch)
        for w, r in zip(batch, results, strict=True):
            if not w.done.done():  # else the client went away
                if isinstance(r, BaseException):
                    w.done.set_exception(r)
                else:
                    w.done.set_result(r)
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
        for pool in (self._pool, self._finish_pool):
            if pool is not None:
                await asyncio.get_running_loop().run_in_executor(None, pool.shutdown, True)
        self._pool = self._finish_pool = None
