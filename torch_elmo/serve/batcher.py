"""The dynamic batcher of `elmo serve`: one queue and one inference worker thread per served model.

The event loop only puts a request (`Job`: its inputs and their whitespace-token counts) in the
queue and awaits it; model code runs on the worker thread alone, so the loop keeps answering
/health, /metrics and 4xx while a batch runs. The worker:

1. waits for a job; then, while other admitted requests are still on their way (`others()`
   counts the server's admitted requests; for `max_wait` after a batch ends, the requests that
   were admitted when it ended count too: closed-loop clients just answered send again, and
   one batch of many texts costs much less per token than two of half as many), waits for
   company until the queued jobs fill `max_batch_tokens` or `max_wait` has passed since the
   oldest job came (or since the worker became free, when that was later). A lone request on a
   quiet server runs at once.
2. takes queued jobs in arrival order (FIFO) while they fit in `max_batch_tokens` (at least one),
3. runs their texts in length-sorted batches of at most `max_batch_tokens` padded tokens
   (embed.length_sorted_batches) through `run_batch`, and hands each job its results in its
   own order as soon as its last text is done.

A job the worker has not taken `queue_timeout` after it came is cancelled (`QueueTimeout`, the
app answers 503). A batch that raises fails its jobs with `ModelError(id)`; the traceback goes
to the log under that id, and the worker goes on with the next batch. In the warm (default) and
zero states a text's vectors do not depend on its batch neighbours, so batching changes no
number (tests/test_serve.py checks it to 1e-6).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid
from typing import Any, Callable, Optional, Sequence

from ..embed import length_sorted_batches
from .metrics import Metrics

log = logging.getLogger("torch_elmo.serve")


class QueueTimeout(Exception):
    """The worker did not take the job within the queue timeout."""


class ModelError(Exception):
    """The model raised on the job's batch; `error_id` is the id the log printed it under."""

    def __init__(self, error_id: str):
        super().__init__(error_id)
        self.error_id = error_id


class Stopped(Exception):
    """The batcher stopped before it took the job."""


class Job:
    """One request: inputs, their token counts, and the futures the event loop awaits."""

    def __init__(self, inputs: Sequence[Any], lengths: Sequence[int],
                 loop: asyncio.AbstractEventLoop):
        self.inputs, self.lengths, self.loop = list(inputs), list(lengths), loop
        self.tokens = sum(max(n, 1) for n in lengths)       # an empty text still costs a row
        self.came = time.monotonic()
        self.state = "queued"                                 # -> running | cancelled
        self.results: list = [None] * len(self.inputs)
        self.remaining = len(self.inputs)
        self.failed = False
        self.started = loop.create_future()
        self.done = loop.create_future()

    def resolve(self, future: asyncio.Future, result=None, error: Optional[Exception] = None):
        """Set `future` from the worker thread (the loop may have closed at shutdown)."""
        def settle():
            if not future.done():
                future.set_result(result) if error is None else future.set_exception(error)
        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass


class Batcher:
    """`run_batch(inputs) -> one result per input` runs on the worker thread; `warmup` is one
    input run before the batcher reports `ready`."""

    def __init__(self, name: str, run_batch: Callable[[list], list], warmup: Any, *,
                 max_batch_tokens: int, max_wait_ms: float, metrics: Metrics,
                 others: Callable[[], int] = lambda: 0):
        self.name, self.run_batch, self.warmup = name, run_batch, warmup
        self.max_batch_tokens, self.max_wait = max_batch_tokens, max_wait_ms / 1000.0
        self.metrics, self.others = metrics, others
        self.queue: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.ready = threading.Event()
        self.warmup_error: Optional[str] = None
        self.stopping = False
        self.free_since = 0.0
        self.expect = 0
        self.thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------- event-loop side
    def start(self) -> None:
        self.thread = threading.Thread(target=self.work, name=f"elmo-worker-{self.name}",
                                       daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand, fail what is still queued (`Stopped`), end the thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    async def submit(self, inputs: Sequence[Any], lengths: Sequence[int],
                     queue_timeout: float) -> list:
        """The results of `inputs`, in order; QueueTimeout, ModelError or Stopped otherwise."""
        job = Job(inputs, lengths, asyncio.get_running_loop())
        with self.cond:
            if self.stopping:
                raise Stopped()
            self.queue.append(job)
            self.metrics.queue_depth.labels(self.name).set(len(self.queue))
            self.cond.notify_all()
        try:
            await asyncio.wait_for(asyncio.shield(job.started), queue_timeout)
        except asyncio.TimeoutError:
            if self.cancel(job):
                raise QueueTimeout() from None
        return await job.done

    def cancel(self, job: Job) -> bool:
        """Take a job the worker has not started out of the queue; False when it has."""
        with self.cond:
            if job.state != "queued":
                return False
            job.state = "cancelled"
            self.queue.remove(job)
            self.metrics.queue_depth.labels(self.name).set(len(self.queue))
            return True

    # ---------------------------------------------------------------------- worker side
    def work(self) -> None:
        try:
            self.run_batch([self.warmup])
        except Exception as e:          # a model that cannot run: /health stays 503, says why
            self.warmup_error = f"{type(e).__name__}: {e}"
            log.exception("%s: the warm-up batch failed", self.name)
            return
        self.ready.set()
        log.info("%s: ready (the warm-up batch ran)", self.name)
        while True:
            with self.cond:
                jobs = self.wait_and_take()
            if jobs is None:
                return
            self.run_jobs(jobs)
            self.free_since = time.monotonic()
            self.expect = self.others()                 # admitted requests, these included

    def wait_and_take(self) -> Optional[list[Job]]:
        """(Holding the lock.) The next jobs to run, or None once stopping."""
        while not self.queue and not self.stopping:
            self.cond.wait()
        if self.stopping:
            for job in self.queue:
                job.resolve(job.started, error=Stopped())
            self.queue.clear()
            return None
        deadline = max(self.queue[0].came, self.free_since) + self.max_wait
        while not self.stopping:
            if sum(j.tokens for j in self.queue) >= self.max_batch_tokens:
                break                                   # a full batch is here
            # the requests admitted when the last batch ended count as on their way for
            # max_wait after it (step 1 of the module doc)
            now, window = time.monotonic(), self.free_since + self.max_wait
            expect = self.expect if now < window else 0
            if max(self.others(), expect) <= len(self.queue):
                break                                   # nobody else is on the way
            left = (min(deadline, window) if expect else deadline) - now
            if left <= 0:
                break
            self.cond.wait(left)
        jobs, tokens = [], 0
        while self.queue and (not jobs or tokens + self.queue[0].tokens <= self.max_batch_tokens):
            job = self.queue.popleft()
            job.state = "running"
            job.resolve(job.started)
            self.metrics.queue_wait.labels(self.name).observe(time.monotonic() - job.came)
            jobs.append(job)
            tokens += job.tokens
        self.metrics.queue_depth.labels(self.name).set(len(self.queue))
        return jobs

    def run_jobs(self, jobs: list[Job]) -> None:
        items = [(job, i) for job in jobs for i in range(len(job.inputs))]
        lengths = [job.lengths[i] for job, i in items]
        for idx in length_sorted_batches(lengths, len(items), self.max_batch_tokens):
            batch = [items[k] for k in idx]
            t0 = time.perf_counter()
            try:
                outs = self.run_batch([job.inputs[i] for job, i in batch])
            except Exception:
                error_id = uuid.uuid4().hex[:12]
                log.exception("%s: model error id=%s on a batch of %d texts", self.name,
                              error_id, len(batch))
                for job in {id(job): job for job, _ in batch}.values():
                    if not job.failed:
                        job.failed = True
                        job.resolve(job.done, error=ModelError(error_id))
                continue
            padded = len(batch) * max(1, max(lengths[k] for k in idx))
            self.metrics.observe_batch(self.name, len(batch), padded,
                                       sum(lengths[k] for k in idx), time.perf_counter() - t0)
            for (job, i), out in zip(batch, outs):
                if job.failed:
                    continue
                job.results[i] = out
                job.remaining -= 1
                if job.remaining == 0:
                    job.resolve(job.done, job.results)
