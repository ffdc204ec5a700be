"""The decodes' queue and the one worker thread that owns the engine and decodes them together.

Requests do not call the engine: each becomes a :class:`Job` that waits in a bounded queue. The
worker keeps an ``engine.batch()`` open while there is work: before every step it admits the
oldest waiting jobs while the batch has room (up to ``--max-batch`` sequences), then runs one
step — one forward over every running sequence — and sends each job its finished blocks and its
result through the job's :class:`Channel`, to the request's asyncio loop. A request that goes
away cancels its job, which then ends at its next step (or is skipped if it has not started).
Each job's tokens are those of its solo decode (see tide_local.batching)."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field

from tide_local.batching import BatchStep, SequenceFailed
from tide_local.diffusion import BlockEvent, DecodeOptions
from tide_local.results import GenerationResult

log = logging.getLogger("tide_local.serve")


class QueueFull(Exception):
    """The queue holds --max-queue waiting jobs already."""


class ShuttingDown(Exception):
    """The server is stopping: the job was not (or not completely) decoded."""


class Dropped(Exception):
    """The job's client left before its decode began: it was never decoded."""


class Channel:
    """One request's events, put by the worker thread and taken in the request's asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self._loop = loop or asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: object) -> None:
        """From any thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    async def get(self) -> object:
        return await self._queue.get()


@dataclass(eq=False)
class Job:
    """One decode: validated prompt ids, stop ids and options; its cancellation; its channel."""

    prompt: list[int]
    stop_ids: list[int]
    options: DecodeOptions
    channel: Channel
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str | None = None  # "disconnect", "stop" (a stop string ended the text), "shutdown"

    def cancel(self, reason: str) -> None:
        """End the decode at its next step, or skip it if it has not started; the first reason stays."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self.cancelled.set()

    async def events(self) -> AsyncIterator[BlockEvent | GenerationResult]:
        """A BlockEvent per finished block, then the GenerationResult; raises instead what the worker
        sent (ShuttingDown, Dropped, or the engine's failure)."""
        while True:
            item = await self.channel.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, GenerationResult):
                return


class Scheduler:
    """Decodes submitted jobs together, up to `max_batch` at a time, oldest first, in one worker thread.

    max_queue: jobs that may wait besides the running ones; `submit` raises QueueFull past it.
    on_result: called in the worker with each GenerationResult; on_step with each step's
    BatchStep (the metrics)."""

    def __init__(self, engine, *, max_queue: int, max_batch: int = 1,
                 on_result: Callable[[GenerationResult], None] | None = None,
                 on_step: Callable[[BatchStep], None] | None = None):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.engine, self.max_queue, self.max_batch = engine, max_queue, max_batch
        self._on_result, self._on_step = on_result, on_step
        self._waiting: collections.deque[Job] = collections.deque()
        self._state = threading.Condition()
        self._running: dict[int, Job] = {}
        self.closed = False
        self._worker = threading.Thread(target=self._work, name="tide-serve-decoder", daemon=True)

    @property
    def waiting(self) -> int:
        """Jobs waiting to be decoded (not those whose client left: the worker skips them)."""
        with self._state:
            return sum(not job.cancelled.is_set() for job in self._waiting)

    @property
    def running(self) -> int:
        """Jobs being decoded now."""
        return len(self._running)

    def running_jobs(self) -> list[Job]:
        with self._state:
            return list(self._running.values())

    def idle(self) -> bool:
        return not self._running and not self._waiting

    def start(self) -> None:
        self._worker.start()

    def submit(self, job: Job) -> None:
        """Queue `job` (ShuttingDown once closed, QueueFull when max_queue jobs wait already)."""
        with self._state:
            if self.closed:
                raise ShuttingDown()
            # a job whose client left gives its place up now, not when the worker reaches it
            for left in [j for j in self._waiting if j.cancelled.is_set()]:
                self._waiting.remove(left)
                left.channel.put(Dropped())
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting)")
            self._waiting.append(job)
            self._state.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no job runs or waits; False after `timeout` seconds."""
        with self._state:
            return self._state.wait_for(self.idle, timeout)

    def close(self) -> None:
        """Take no more jobs: the waiting ones fail with ShuttingDown, the running ones are
        cancelled at their next step, then the worker ends. Idempotent, from any thread."""
        with self._state:
            self.closed = True
            rejected = list(self._waiting)
            self._waiting.clear()
            for job in self._running.values():
                job.cancel("shutdown")
            self._state.notify_all()
        for job in rejected:
            job.channel.put(ShuttingDown())

    def join(self, timeout: float | None = None) -> None:
        """Wait for the worker to end (after close)."""
        if self._worker.is_alive():
            self._worker.join(timeout)

    def alive(self) -> bool:
        """Whether the worker runs (it may be inside the engine)."""
        return self._worker.is_alive()

    def _work(self) -> None:
        while True:
            with self._state:
                self._state.wait_for(lambda: self._waiting or self.closed)
                if not self._waiting:
                    return  # closed
            try:
                with self.engine.batch(self.max_batch) as batch:  # open while there is work
                    while self._admit(batch) or batch.running:
                        self._step(batch)
            except Exception as err:  # the engine failed (requests were checked before): a 500 each; the worker goes on
                log.exception("decoding failed")
                self._fail_running(err)
            finally:
                with self._state:
                    self._state.notify_all()

    def _admit(self, batch) -> bool:
        """Move the oldest waiting jobs into the batch while it has room; whether any runs now."""
        while batch.has_room():
            with self._state:
                if not self._waiting:
                    break
                job = self._waiting.popleft()
                if job.cancelled.is_set():  # its client left while it waited
                    job.channel.put(Dropped())
                    continue
                self._running[id(job)] = job
            try:
                batch.add(id(job), job.prompt, stop_ids=job.stop_ids, cancel=job.cancelled, **asdict(job.options))
            except Exception as err:  # checked when the request came: only a changed engine gets here
                self._finish(job, err)
        return bool(self._running)

    def _step(self, batch) -> None:
        for key, event in batch.step():
            job = self._running[key]
            if isinstance(event, GenerationResult):
                if self._on_result is not None:
                    self._on_result(event)
                self._finish(job, event)
            elif isinstance(event, SequenceFailed):
                log.error("decoding failed", exc_info=event.error)
                self._finish(job, event.error)
            elif isinstance(event, BlockEvent):  # steps stay here: nobody reads them
                job.channel.put(event)
        if batch.last_step is not None and self._on_step is not None:
            self._on_step(batch.last_step)

    def _finish(self, job: Job, last: object) -> None:
        job.channel.put(last)
        with self._state:
            self._running.pop(id(job), None)
            self._state.notify_all()

    def _fail_running(self, err: Exception) -> None:
        for job in list(self._running.values()):
            self._finish(job, err)
