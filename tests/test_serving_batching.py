"""MicroBatcher: requests waiting together are decided together, each gets its own answer."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serving.batching import MicroBatcher


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_waiting_requests_share_a_batch_and_get_their_own_results() -> None:
    seen: list[list[int]] = []
    gate = threading.Event()

    def double(items: list[int]) -> list[int]:
        gate.wait(5)  # the first batch holds the worker while the others queue up
        seen.append(list(items))
        return [2 * i for i in items]

    async def main() -> list[int]:
        b: MicroBatcher[int, int] = MicroBatcher(double, workers=1, max_batch=8, name="t")
        first = asyncio.create_task(b.submit(0))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(b.submit(i)) for i in range(1, 11)]
        await asyncio.sleep(0.05)
        gate.set()
        out = [await first, *[await t for t in rest]]
        await b.close()
        assert b.items == 11 and b.batches == 3
        return out

    assert _run(main()) == [2 * i for i in range(11)]
    assert seen[0] == [0]
    assert seen[1] == list(range(1, 9))  # max_batch caps a batch; order is arrival order
    assert seen[2] == [9, 10]


def test_one_failing_item_does_not_fail_its_neighbours() -> None:
    def check(items: list[int]) -> list[int | BaseException]:
        return [ValueError(f"bad {i}") if i < 0 else i for i in items]

    async def main() -> tuple[list[int], str]:
        b: MicroBatcher[int, int] = MicroBatcher(check, workers=2, max_batch=4, name="t")
        tasks = [asyncio.create_task(b.submit(i)) for i in (1, -1, 2)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await b.close()
        ok = [r for r in results if isinstance(r, int)]
        err = next(str(r) for r in results if isinstance(r, ValueError))
        return ok, err

    assert _run(main()) == ([1, 2], "bad -1")


def test_a_failing_call_reaches_every_request_of_the_batch_and_the_batcher_goes_on() -> None:
    calls = 0

    def flaky(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("store down")
        return items

    async def main() -> tuple[list[object], int]:
        b: MicroBatcher[int, int] = MicroBatcher(flaky, workers=1, max_batch=8, name="t")
        first = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
        again = await b.submit(3)
        await b.close()
        return first, again

    first, again = _run(main())
    assert all(isinstance(r, ConnectionError) for r in first)
    assert again == 3


def test_close_decides_what_is_queued_first() -> None:
    def slow(items: list[int]) -> list[int]:
        threading.Event().wait(0.02)
        return items

    async def main() -> list[int]:
        b: MicroBatcher[int, int] = MicroBatcher(slow, workers=1, max_batch=2, name="t")
        tasks = [asyncio.create_task(b.submit(i)) for i in range(7)]
        await asyncio.sleep(0)  # queued, not yet decided
        await b.close()
        assert all(t.done() for t in tasks)
        return [t.result() for t in tasks]

    assert _run(main()) == list(range(7))


def test_a_wrong_number_of_results_is_an_error_not_a_silent_mismatch() -> None:
    async def main() -> None:
        b: MicroBatcher[int, int] = MicroBatcher(lambda items: items[:-1], workers=1, max_batch=4, name="t")
        with pytest.raises(RuntimeError, match="results for"):
            await asyncio.gather(b.submit(1), b.submit(2))
        await b.close()

    _run(main())


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        MicroBatcher(lambda items: items, workers=0, max_batch=4, name="t")


def test_each_batch_size_is_reported() -> None:
    sizes: list[int] = []

    async def main() -> None:
        b: MicroBatcher[int, int] = MicroBatcher(
            lambda items: items, workers=1, max_batch=4, name="t", on_batch=sizes.append
        )
        await asyncio.gather(*(b.submit(i) for i in range(6)))
        await b.close()

    _run(main())
    assert sum(sizes) == 6 and max(sizes) <= 4


def test_the_next_batch_is_decided_while_the_last_one_finishes_and_answers_wait_for_their_finish() -> None:
    """The second stage (the decision log's commit) runs beside the next batch's first stage; a
    request is answered only after its own batch's finish returned; finishes run in order."""
    finishing = threading.Event()
    release = threading.Event()
    decided: list[list[int]] = []
    finished: list[list[int]] = []

    def decide(items: list[int]) -> list[int]:
        decided.append(list(items))
        return items

    def finish(results: list[int | BaseException]) -> list[int | BaseException]:
        if results == [0]:
            finishing.set()
            release.wait(5)  # the first batch's commit hangs until released
        finished.append([r for r in results if isinstance(r, int)])
        return [r * 10 for r in results if isinstance(r, int)]

    async def main() -> None:
        b: MicroBatcher[int, int] = MicroBatcher(
            decide, workers=1, max_batch=8, name="t", finish=finish, finish_depth=2
        )
        first = asyncio.create_task(b.submit(0))
        while not finishing.is_set():
            await asyncio.sleep(0.01)
        second = asyncio.create_task(b.submit(1))
        for _ in range(200):  # the second batch is decided while the first one's commit hangs
            if decided == [[0], [1]]:
                break
            await asyncio.sleep(0.01)
        assert decided == [[0], [1]] and finished == []
        await asyncio.sleep(0.05)
        assert not first.done() and not second.done()  # no answer before its own batch's commit
        release.set()
        assert await first == 0 and await second == 10
        assert finished == [[0], [1]]  # commits in decision order
        await b.close()
        assert b.batches == 2 and b.items == 2

    _run(main())


def test_at_most_finish_depth_batches_wait_for_their_finish() -> None:
    release = threading.Event()
    decided: list[int] = []

    def decide(items: list[int]) -> list[int]:
        decided.extend(items)
        return items

    def finish(results: list[int | BaseException]) -> list[int | BaseException]:
        release.wait(5)
        return results

    async def main() -> list[int]:
        b: MicroBatcher[int, int] = MicroBatcher(
            decide, workers=1, max_batch=1, name="t", finish=finish, finish_depth=1
        )
        tasks = [asyncio.create_task(b.submit(i)) for i in range(4)]
        await asyncio.sleep(0.3)
        # batch 0 waits for its finish; batch 1 is decided, then waits for a slot: no batch 2 yet
        assert decided == [0, 1]
        release.set()
        out = [await t for t in tasks]
        await b.close()
        return out

    assert _run(main()) == [0, 1, 2, 3]


def test_a_failing_finish_fails_only_its_own_batch() -> None:
    def finish(results: list[int | BaseException]) -> list[int | BaseException]:
        if 0 in results:
            raise ConnectionError("log down")
        return results

    async def main() -> tuple[list[object], int]:
        b: MicroBatcher[int, int] = MicroBatcher(
            lambda xs: xs, workers=1, max_batch=8, name="t", finish=finish
        )
        first = await asyncio.gather(b.submit(0), return_exceptions=True)
        again = await b.submit(3)
        await b.close()
        return first, again

    first, again = _run(main())
    assert isinstance(first[0], ConnectionError) and again == 3


def test_close_waits_for_every_batch_to_finish() -> None:
    """Shutdown decides what is queued and waits for each batch's commit before it returns."""
    import time

    finished: list[int] = []

    def finish(results: list[int | BaseException]) -> list[int | BaseException]:
        time.sleep(0.02)
        finished.extend(r for r in results if isinstance(r, int))
        return results

    async def main() -> list[int]:
        b: MicroBatcher[int, int] = MicroBatcher(
            lambda xs: xs, workers=1, max_batch=3, name="t", finish=finish
        )
        tasks = [asyncio.create_task(b.submit(i)) for i in range(20)]
        await asyncio.sleep(0)
        await b.close()
        assert sorted(finished) == list(range(20))  # every commit done before close returned
        return [t.result() for t in tasks]

    assert _run(main()) == list(range(20))


def test_the_same_batcher_serves_one_event_loop_after_another() -> None:
    """The worker threads belong to no event loop: each answer goes back to the loop its request
    waits on (the app's tests, and a restarted server, run it on several loops in turn)."""
    b: MicroBatcher[int, int] = MicroBatcher(lambda xs: [x + 1 for x in xs], workers=2, max_batch=4, name="t")

    async def use(first: int) -> list[int]:
        return list(await asyncio.gather(*(b.submit(i) for i in range(first, first + 6))))

    assert _run(use(0)) == [1, 2, 3, 4, 5, 6]
    assert _run(use(10)) == [11, 12, 13, 14, 15, 16]
    _run(b.close())
    assert _run(use(20)) == [21, 22, 23, 24, 25, 26]  # closed, then used again: threads start anew
    _run(b.close())
    assert b.items == 18
