"""Dynamic batching for ``megabert serve``: one queue, one worker thread, batches by token budget.

The HTTP handlers tokenize a request themselves (the pipeline's own ``_normalize`` and
``_encode``, so input errors are answered at once, naming the input, and the token count of the
request is known) and put a :class:`Job` on the queue. One worker thread takes the oldest job,
adds the next jobs of the same pipeline and parameters while the batch stays within
``max_batch_tokens`` and ``max_batch_requests``, runs all their rows through the pipeline's
``run_rows`` in length-sorted forward passes (the pipelines' own; the model is loaded
with ``unpad_inputs`` so padding never reaches the layers), and answers each job with the
pipeline's ``_postprocess``. A single worker owns the model: no locking around it, and a
request's latency is its queue time plus one batch. While requests are still being read or
tokenized (``incoming``) the worker holds a batch with room for up to ``max_wait``; a job
whose future is cancelled before its batch starts (:meth:`Batcher.cancel`: the client went
away or timed out) is dropped and never runs.

A row's result does not depend on its batch-mates: every layer works on each row (each token,
unpadded) on its own, so a text gives the same numbers alone or in any batch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from megabert.inference.base import Encoded, Pipeline

logger = logging.getLogger(__name__)

# Test-only hooks (read once when the batcher starts; never set them in production):
# MEGABERT_SERVE_TEST_DELAY=SECONDS sleeps that long in every batch, so that tests can hold
# requests in flight (429s, SIGTERM drain); MEGABERT_SERVE_TEST_FAIL_BATCHES=N makes the first N
# batches after the warm-up raise, to check that a failed batch fails only its own requests.
TEST_DELAY_ENV = "MEGABERT_SERVE_TEST_DELAY"
TEST_FAIL_ENV = "MEGABERT_SERVE_TEST_FAIL_BATCHES"


class BatchError(Exception):
    """A batch failed; ``str()`` is a one-line reason fit for an HTTP 500 body."""


class ShuttingDown(Exception):
    """The batcher is stopping and takes no new jobs."""


@dataclass
class Job:
    """One request's work: its pipeline, checked parameters, encoded inputs and the future to answer.

    ``key`` groups jobs that may share a batch (same pipeline, same parameters);
    ``postprocess`` (optional) replaces the pipeline's ``_postprocess`` for routes whose inputs
    were not texts (token ids) or whose result is built differently.
    """

    key: tuple
    pipeline: Pipeline
    params: dict[str, Any]
    items: list[Any]
    encoded: list[Encoded]
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    postprocess: Callable[[Any, Encoded, list[Any]], Any] | None = None

    @property
    def tokens(self) -> int:
        return sum(len(row) for enc in self.encoded for row in enc.rows)


def token_budget_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Row indices in forward passes, longest first, each within ``max_tokens`` padded tokens.

    The same order as :func:`megabert.inference.batching.length_sorted_batches` (stable, longest
    first), cut by a token budget instead of a row count, since rows vary from 3 to the model's
    length. A row longer than the budget runs alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # Sorted longest first: the first row of a pass is its longest, so padded size = n * longest.
        if current and (len(current) + 1) * lengths[current[0]] > max_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


class Batcher:
    """The request queue and its single worker thread (see the module docstring).

    Args:
        max_batch_tokens: most tokens in one batch (summed over the jobs; also the padded size
            of one forward pass).
        max_batch_requests: most jobs in one batch (None: no limit but the token budget).
        metrics: an object with ``observe_batch(tokens, requests, seconds)``,
            ``observe_queue(seconds)`` and ``set_queue_depth(n)``, or None.
        incoming: the number of requests accepted but not queued yet (still being read or
            tokenized), or None. While it is above 0 and the batch has room, the worker waits
            for them, up to ``max_wait`` seconds: under load the next batch is then one large
            batch instead of many of one or two requests (whose fixed cost per forward pass, on
            a CPU, also starves the threads that would feed it). A lone request (nothing
            incoming) never waits.
    """

    def __init__(
        self,
        max_batch_tokens: int = 16384,
        max_batch_requests: int | None = None,
        metrics: Any = None,
        incoming: Callable[[], int] | None = None,
        max_wait: float = 0.01,
    ) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self.metrics = metrics
        self.incoming = incoming
        self.max_wait = max_wait
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="megabert-batcher", daemon=True)
        self._delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
        self._fail_batches = int(os.environ.get(TEST_FAIL_ENV, "0") or 0)
        self._armed = False  # the failure hook only counts batches after the warm-up

    def start(self) -> None:
        self._thread.start()

    def arm_test_hooks(self) -> None:
        """Called after the warm-up batch: from now on the test-only failure hook counts batches."""
        self._armed = True

    def submit(self, job: Job) -> Future:
        """Queue a job; its future gets the list of per-input results, or a BatchError/UserError."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            self._pending.append(job)
            self._set_depth()
            self._cond.notify()
        return job.future

    def cancel(self, job: Job) -> bool:
        """Drop a job that has not started (its client went away or timed out); False once it runs."""
        with self._cond:
            if job not in self._pending or not job.future.cancel():
                return False
            self._pending.remove(job)
            self._set_depth()
            return True

    def stop(self, timeout: float | None = None) -> None:
        """Finish the queued jobs, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._pending)

    # ------------------------------------------------------------------ worker
    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(len(self._pending))

    def _take_batch(self) -> list[Job] | None:
        """The next batch: the oldest job and the following jobs of its key, within the limits."""
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._cond.wait()
            # Jobs whose future was cancelled (the client went away) are dropped, never run.
            self._pending = [job for job in self._pending if not job.future.cancelled()]
            if not self._pending:
                self._set_depth()
                return []
            self._wait_for_incoming()
            first = self._pending[0]
            batch, tokens = [], 0
            for job in list(self._pending):
                if job.key != first.key:
                    continue
                if batch and (tokens + job.tokens > self.max_batch_tokens or (
                    self.max_batch_requests is not None and len(batch) >= self.max_batch_requests
                )):
                    break
                self._pending.remove(job)
                # From here on the job cannot be cancelled (Batcher.cancel answers False).
                if not job.future.set_running_or_notify_cancel():
                    continue
                batch.append(job)
                tokens += job.tokens
            self._set_depth()
            return batch

    def _wait_for_incoming(self) -> None:
        """Hold the batch (the lock is held) while requests are on their way and it has room."""
        if self.incoming is None or self.max_wait <= 0:
            return
        deadline = time.perf_counter() + self.max_wait
        while not self._stopping and self.incoming() > 0:
            key = self._pending[0].key
            jobs = [job for job in self._pending if job.key == key]
            if sum(job.tokens for job in jobs) >= self.max_batch_tokens or (
                self.max_batch_requests is not None and len(jobs) >= self.max_batch_requests
            ):
                return
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._cond.wait(min(left, 0.002))  # a submit wakes it at once

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if not batch:
                continue
            now = time.perf_counter()
            if self.metrics is not None:
                for job in batch:
                    self.metrics.observe_queue(now - job.enqueued)
            try:
                outputs = self._forward(batch)
            except Exception as exc:  # one batch's failure must not stop the server
                reason = " ".join(str(exc).split()) or type(exc).__name__
                logger.error("batch of %d request(s) failed: %s: %s", len(batch), type(exc).__name__, reason)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(BatchError(f"inference failed: {type(exc).__name__}: {reason}"))
                continue
            finally:
                if self.metrics is not None:
                    self.metrics.observe_batch(
                        sum(job.tokens for job in batch), len(batch), time.perf_counter() - now
                    )
            for job, job_outputs in zip(batch, outputs):
                self._answer(job, job_outputs)

    def _forward(self, batch: list[Job]) -> list[list[list[Any]]]:
        """Run every row of the batch's jobs; returns, per job, per input, its rows' outputs."""
        if self._delay:
            time.sleep(self._delay)
        if self._armed and self._fail_batches > 0:
            self._fail_batches -= 1
            raise RuntimeError(f"test hook {TEST_FAIL_ENV} failed this batch")
        pipe, params = batch[0].pipeline, batch[0].params
        rows, owners = [], []
        for j, job in enumerate(batch):
            for i, enc in enumerate(job.encoded):
                for row in enc.rows:
                    rows.append(row)
                    owners.append((j, i))
        passes = token_budget_batches([len(row) for row in rows], self.max_batch_tokens)
        results = pipe.run_rows(rows, params, passes)
        per_job: list[list[list[Any]]] = [[[] for _ in job.encoded] for job in batch]
        for (j, i), result in zip(owners, results):
            per_job[j][i].append(result)
        return per_job

    def _answer(self, job: Job, outputs: list[list[Any]]) -> None:
        """Postprocess one job's inputs; an error here fails this job only."""
        try:
            answers = []
            for index, (item, enc, outs) in enumerate(zip(job.items, job.encoded, outputs)):
                job.pipeline.check_answerable(index, outs)  # never answer NaN (JSON has none)
                if job.postprocess is not None:
                    answers.append(job.postprocess(item, enc, outs))
                else:
                    answers.append(job.pipeline._postprocess(item, enc, outs, job.params))
            job.future.set_result(answers)
        except Exception as exc:
            if not job.future.done():
                job.future.set_exception(exc)
