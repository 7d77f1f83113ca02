"""Requests gathered into batches: each waiting request's rows join one embedding pass, run on one
thread beside the event loop (which keeps reading and checking requests meanwhile)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class Batcher:
    """``submit(job)`` waits for ``work``'s result for that job; ``work`` gets the jobs of up to ``max_batch``
    requests at once: those waiting when the previous batch ends, and those that arrive within
    ``batch_timeout`` seconds of the first. ``work`` returns one result per job, in order."""

    def __init__(self, work: Callable[[list[Any]], list[Any]], max_batch: int, batch_timeout: float) -> None:
        self.work, self.max_batch, self.batch_timeout = work, max_batch, batch_timeout
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="lore-pl-batch")  # torch runs here, one batch at a time

    def start(self) -> None:
        """Start gathering (inside the running event loop)."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._gather())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def submit(self, job: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((job, future))
        return await future

    async def _next_batch(self) -> list:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_timeout
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(min(remaining, 0.001))  # polled: a cancelled get could drop a request
        return [(job, future) for job, future in batch if not future.done()]  # a client that gave up is skipped

    async def _gather(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._thread, self.work, [job for job, _ in batch])
            except Exception as error:  # a fault of the server's, not of one request: every waiting request hears it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
