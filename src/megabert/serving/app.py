"""The HTTP app of ``megabert serve``: TEI- and OpenAI-compatible routes over the pipelines.

:func:`load_service` loads a model folder once and builds the pipeline of every head the
checkpoint has; :func:`build_app` wraps a :class:`Service` in a FastAPI app. Every route
tokenizes with its pipeline's own ``_normalize``/``_encode`` (so inputs are checked, and errors
worded, exactly as in ``megabert predict`` commands), queues the encoded rows on the
:class:`~megabert.serving.batcher.Batcher`, and answers with the pipeline's ``_postprocess``.

Errors are JSON, never a traceback: ``{"error": "...", "error_type": "..."}`` (TEI's shape;
the OpenAI routes use ``{"error": {"message", "type", "param", "code"}}``).
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from megabert.errors import UserError
from megabert.inference.base import Encoded, Pipeline
from megabert.inference.batching import Row
from megabert import task_table
from megabert.inference.feature_extraction import FeatureExtractionPipeline
from megabert.devices import resolve_device
from megabert.inference.loading import check_model_folder, checkpoint_keys, load_model, read_config
from megabert.inference.pipelines import PIPELINE_CLASSES
from megabert.serving.batcher import BatchError, Batcher, Job, ShuttingDown
from megabert.tokenization import load_tokenizer

access_logger = logging.getLogger("megabert.serve.access")
logger = logging.getLogger("megabert.serve")

# The megabert head routes: route -> the service.pipelines key of the pipeline it needs.
HEAD_ROUTES = {
    "/fill-mask": "fill-mask",
    "/token-classification": "token-classification",
    "/question-answering": "question-answering",
    "/next-sentence": "next-sentence",
    "/multiple-choice": "multiple-choice",
}
# Routes that run the model: counted against --max-concurrent-requests.
INFERENCE_ROUTES = {"/embed", "/predict", "/rerank", "/v1/embeddings", *HEAD_ROUTES}
ALL_ROUTES = {"/health", "/info", "/metrics", "/tokenize", "/decode", *INFERENCE_ROUTES}
POOLINGS = ("mean", "cls", "pooler")
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024  # TEI's payload limit is 2 MB; 32 texts of 512 tokens are ~100 kB
DEFAULT_REQUEST_TIMEOUT = 60.0


class _Call:
    """One inference request on its way: its Starlette request (for _run to watch for the client
    going away) and whether it still counts in ``Service.preparing`` (read, not yet queued)."""

    __slots__ = ("request", "preparing")

    def __init__(self) -> None:
        self.request: Any = None
        self.preparing = False

    def queued(self, service: Service) -> None:
        if self.preparing:
            self.preparing = False
            service.preparing -= 1


# Set by the gate middleware for each inference request; the endpoint's task sees the same object.
_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("megabert_serve_call", default=None)


class HTTPError(Exception):
    """An error answered as JSON with ``status``; ``error_type`` as TEI names them."""

    def __init__(self, status: int, message: str, error_type: str = "Validation", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.headers = headers or {}


@dataclass
class Limits:
    """The server's limits (the ``serve`` options of the same names)."""

    max_batch_tokens: int = 16384
    max_batch_requests: int | None = None
    max_concurrent_requests: int = 512
    max_client_batch_size: int = 32
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT  # seconds in the queue and the model; None: no limit


@dataclass
class Service:
    """A loaded model, its tokenizer, one pipeline per head, and the serving state."""

    name: str
    folder: Path
    config: Any
    tokenizer: Any
    heads: list[str]
    model_task: str
    pipelines: dict[str, Pipeline]
    pooling: str
    limits: Limits
    api_key: str | None = None
    ready: bool = False
    server: Any = None  # the uvicorn.Server, to answer 503 once it is shutting down
    batcher: Batcher | None = None
    metrics: Any = None
    in_flight: int = 0
    preparing: int = 0  # inference requests accepted and not queued yet (the batcher waits for them)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def embed(self) -> FeatureExtractionPipeline:
        return self.pipelines["feature-extraction"]  # type: ignore[return-value]

    @property
    def draining(self) -> bool:
        """SIGTERM was received: new requests get 503 while the ones in flight finish."""
        server = self.server
        return server is not None and bool(getattr(server, "draining", False) or getattr(server, "should_exit", False))

    @property
    def idle(self) -> bool:
        """No inference request in flight and none queued (the drain can end)."""
        return self.in_flight == 0 and (self.batcher is None or self.batcher.depth == 0)

    def available(self) -> list[str]:
        """The routes this model answers (the others give 404)."""
        routes = ["/embed", "/v1/embeddings", "/tokenize", "/decode"]
        if "text-classification" in self.pipelines:
            routes.append("/predict")
            if int(self.config.num_labels) == 1:
                routes.append("/rerank")
        routes += [route for route, key in HEAD_ROUTES.items() if key in self.pipelines]
        return routes


# ----------------------------------------------------------------------------- loading
def _model_task(heads: list[str], architectures: list[str] | None) -> str:
    """The model class that carries every head of the checkpoint (``base`` when it has none)."""
    if "masked-lm" in heads and "next-sentence" in heads:
        return "pretraining"
    if "masked-lm" in heads:
        return "masked-lm"
    if "next-sentence" in heads:
        return "next-sentence"
    if "question-answering" in heads:
        return "question-answering"
    if "classifier" in heads:  # three models share the head's name: config.json's class tells which
        for arch in architectures or ():
            task = task_table.task_of_class(arch)
            if task is not None and task.heads == ("classifier",):
                return task.name
        return "sequence-classification"
    return "base"


def load_service(
    model: str | Path,
    *,
    device: str | None = None,
    dtype: str | None = None,
    pooling: str = "mean",
    limits: Limits | None = None,
    api_key: str | None = None,
    name: str | None = None,
) -> Service:
    """Load a model folder once and build the pipeline of each head it has (all sharing the weights).

    Errors with the folder are UserErrors (one line, before the server starts).
    """
    folder = check_model_folder(model)
    tokenizer = load_tokenizer(model_folder=folder)
    config = read_config(folder)
    from megabert.modeling.heads import heads_in_checkpoint

    heads = heads_in_checkpoint(checkpoint_keys(folder))
    model_task = _model_task(heads, config.architectures)
    if pooling not in POOLINGS:
        raise UserError(f"--pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if pooling == "pooler" and "pooler" not in heads:
        raise UserError('--pooling pooler needs pooler weights, and this checkpoint has none; use "cls" or "mean"')
    loaded, heads = load_model(
        folder, model_task, task="serve", head=None, dtype=dtype, device=resolve_device(device), unpad_inputs=True
    )
    encoder = loaded if model_task == "base" else loaded.bert
    pipelines: dict[str, Pipeline] = {
        "feature-extraction": FeatureExtractionPipeline(encoder, tokenizer, has_pooler="pooler" in heads),
    }
    # The model's own pipeline, and those of the heads it carries besides (a pretraining model
    # serves fill-mask and next-sentence), keyed by pipeline name.
    for task in task_table.tasks(task_table.PIPELINE):
        if task.name != "base" and model_task in (task.name, *task.also_runs_on):
            pipelines[task.primary(task_table.PIPELINE)] = PIPELINE_CLASSES[task.name](loaded, tokenizer)
    return Service(
        name=name or folder.resolve().name, folder=folder, config=config, tokenizer=tokenizer, heads=heads,
        model_task=model_task, pipelines=pipelines, pooling=pooling, limits=limits or Limits(), api_key=api_key,
    )  # fmt: skip


# ----------------------------------------------------------------------------- metrics
class Metrics:
    """Prometheus metrics on a registry of their own (several apps in one process stay apart)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("megabert_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry)
        self.request_seconds = Histogram("megabert_request_seconds", "request latency", ["route"], registry=self.registry)
        self.queue_seconds = Histogram("megabert_queue_seconds", "time a request waited in the queue", registry=self.registry)
        self.inference_seconds = Histogram("megabert_inference_seconds", "time of one batch on the model", registry=self.registry)
        self.batch_tokens = Histogram(
            "megabert_batch_tokens", "tokens per batch", registry=self.registry,
            buckets=(16, 64, 256, 1024, 4096, 16384, 65536, float("inf")),
        )  # fmt: skip
        self.batch_requests = Histogram(
            "megabert_batch_requests", "requests per batch", registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, float("inf")),
        )  # fmt: skip
        self.queue_depth = Gauge("megabert_queue_depth", "requests waiting for the model", registry=self.registry)
        self.dropped = Counter(
            "megabert_dropped_requests", "requests dropped from the queue before they ran, by reason",
            ["reason"], registry=self.registry,
        )  # fmt: skip

    def observe_batch(self, tokens: int, requests: int, seconds: float) -> None:
        self.batch_tokens.observe(tokens)
        self.batch_requests.observe(requests)
        self.inference_seconds.observe(seconds)

    def observe_queue(self, seconds: float) -> None:
        self.queue_seconds.observe(seconds)

    def set_queue_depth(self, n: int) -> None:
        self.queue_depth.set(n)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ----------------------------------------------------------------------------- helpers
def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, set):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    from fastapi import Response

    body = json.dumps(content, default=_jsonable, allow_nan=False, separators=(",", ":"))
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _error_response(exc: HTTPError, openai: bool = False) -> Any:
    if openai:
        kinds = {401: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable"}
        content: dict[str, Any] = {"error": {
            "message": exc.message, "type": kinds.get(exc.status, "invalid_request_error" if exc.status < 500 else "server_error"),
            "param": exc.param, "code": exc.error_type.lower(),
        }}  # fmt: skip
    else:
        content = {"error": exc.message, "error_type": exc.error_type}
    return _json_response(content, exc.status, exc.headers)


def _too_large(size: str, limit: int) -> HTTPError:
    return HTTPError(
        413, f"body: {size}, more than this server takes (--max-body-bytes {limit})", error_type="PayloadTooLarge",
        param="body", headers={"Connection": "close"},
    )  # fmt: skip


async def _read_body(request: Any, limit: int) -> dict[str, Any]:
    """The JSON object of the body, read only up to ``limit`` bytes (413 beyond, before any parsing)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise _too_large(f"{int(declared)} bytes", limit)
    chunks, size = [], 0
    async for chunk in request.stream():  # chunked bodies have no content-length: count as they come
        size += len(chunk)
        if size > limit:
            raise _too_large(f"more than {limit} bytes", limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise HTTPError(422, "body: not valid JSON", param="body") from None
    if not isinstance(body, dict):
        raise HTTPError(422, f"body: expected a JSON object, got {type(body).__name__}", param="body")
    return body


def _field(body: dict[str, Any], name: str, kinds: type | tuple[type, ...], default: Any = ..., what: str = "") -> Any:
    """``body[name]`` checked against ``kinds`` (a 422 naming the field otherwise)."""
    if name not in body or (body[name] is None and default is not ...):
        if default is ...:
            raise HTTPError(422, f"{name}: missing (a required field)", param=name)
        return default
    value = body[name]
    if kinds is int or kinds == (int,):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)))
    if not ok:
        raise HTTPError(422, f"{name}: expected {what or _kind_names(kinds)}, got {type(value).__name__}", param=name)
    return value


def _kind_names(kinds: type | tuple[type, ...]) -> str:
    names = {str: "a string", bool: "true or false", int: "an integer", list: "a list", dict: "an object", float: "a number"}
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _unknown_fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise HTTPError(422, f"{unknown[0]}: unknown field (this route takes {', '.join(sorted(allowed))})", param=unknown[0])


def _as_batch(service: Service, inputs: Any, field_name: str, single: bool) -> list[Any]:
    """A request's inputs as a list (one input or a batch), within --max-client-batch-size."""
    items = [inputs] if single else inputs
    if not isinstance(items, list):
        raise HTTPError(422, f"{field_name}: expected one input or a list of inputs, got {type(inputs).__name__}", param=field_name)
    if not items:
        raise HTTPError(422, f"{field_name}: empty (give at least one input)", param=field_name)
    limit = service.limits.max_client_batch_size
    if len(items) > limit:
        raise HTTPError(
            413, f"{field_name}: {len(items)} inputs, more than this server takes in one request "
            f"(--max-client-batch-size {limit})", param=field_name,
        )  # fmt: skip
    return items


def _prepare(
    service: Service,
    pipe: Pipeline,
    items: list[Any],
    params: dict[str, Any],
    postprocess: Callable[[Any, Encoded, list[Any]], Any] | None = None,
    encoded: list[Encoded] | None = None,
    tag: str = "",
) -> Job:
    """A job for ``items`` with the pipeline's own parameter checks, normalization and tokenization."""
    unknown = sorted(set(params) - set(pipe.call_defaults))
    if unknown:
        raise HTTPError(422, f"parameters.{unknown[0]}: unknown (this route takes {', '.join(sorted(pipe.call_defaults))})",
                        param=unknown[0])  # fmt: skip
    checked = pipe._check_params({**pipe.defaults, **params})
    if encoded is None:
        items = [pipe._normalize(item, i) for i, item in enumerate(items)]
        encoded = pipe._encode(items, 0, checked)
    # Jobs share a batch only with jobs of the same pipeline and parameters (_forward takes one set).
    key = (id(pipe), tag, json.dumps(params, sort_keys=True, default=str))
    return Job(key=key, pipeline=pipe, params=checked, items=items, encoded=encoded, postprocess=postprocess)


class ClientGone(Exception):
    """The client closed its connection before its answer was ready (nobody reads the response)."""


async def _wait_disconnect(request: Any) -> None:
    """Return once the client has closed the connection (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _run(service: Service, job: Job) -> list[Any]:
    """Queue the job and wait for its results, within --request-timeout and while the client is there.

    A job whose client goes away, or whose time runs out, while it waits in the queue is dropped
    from it (it never reaches the model); one already in a batch finishes, its answer unread.
    """
    batcher = service.batcher
    call = _CALL.get()
    try:
        future = batcher.submit(job)  # type: ignore[union-attr]
    except ShuttingDown:
        raise HTTPError(503, "the server is shutting down", error_type="Unhealthy") from None
    finally:
        if call is not None:
            call.queued(service)  # after the submit: the worker always sees it incoming or queued
    result = asyncio.wrap_future(future)
    request = call.request if call is not None else None
    watch = asyncio.ensure_future(_wait_disconnect(request)) if request is not None else None
    timeout = service.limits.request_timeout
    try:
        done, _ = await asyncio.wait([result] if watch is None else [result, watch], timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
    finally:
        if watch is not None:
            watch.cancel()
    if result in done:
        return result.result()
    reason = "disconnected" if watch is not None and watch in done else "timeout"
    dropped = batcher.cancel(job)  # type: ignore[union-attr]
    if dropped and service.metrics is not None:
        service.metrics.dropped.labels(reason).inc()
    result.cancel()
    if reason == "disconnected":
        logger.info("client went away; its request was %s", "dropped from the queue" if dropped else "already running")
        raise ClientGone()
    raise HTTPError(
        503, f"no answer within {timeout:g} s (--request-timeout {timeout:g}); the server is busy, retry later",
        error_type="Timeout", headers={"Retry-After": "1"},
    )  # fmt: skip


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Tokenization off the event loop (the Rust tokenizer releases the GIL)."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def _missing_head(service: Service, route: str, needs: str) -> HTTPError:
    return HTTPError(
        404, f"{route}: this model has no {needs} (its heads: {', '.join(service.heads) or 'none'}; "
        f"routes it answers: {', '.join(service.available())})", error_type="NotFound",
    )  # fmt: skip


# ----------------------------------------------------------------------------- routes
def _embed_params(service: Service, normalize: bool, truncate: bool) -> dict[str, Any]:
    return {"pooling": service.pooling, "normalize": normalize, "truncation": truncate}


async def route_embed(service: Service, body: dict[str, Any]) -> Any:
    """TEI ``/embed``: ``inputs`` (str or list), ``normalize`` (default true), ``truncate``; a list of vectors."""
    _unknown_fields(body, {"inputs", "normalize", "truncate", "truncation_direction", "prompt_name"})
    inputs = _field(body, "inputs", (str, list))
    normalize = _field(body, "normalize", bool, True)
    truncate = _field(body, "truncate", bool, False)
    items = _as_batch(service, inputs, "inputs", isinstance(inputs, str))
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise HTTPError(422, f"inputs[{i}]: expected a string, got {type(item).__name__}", param="inputs")
    job = await _in_thread(_prepare, service, service.embed, items, _embed_params(service, normalize, truncate))
    return await _run(service, job)


def _ids_job(service: Service, ids_lists: list[list[int]], params: dict[str, Any]) -> Job:
    """A job over token ids (OpenAI's ``input`` as ids): ``[CLS] ids [SEP]``, one row each."""
    pipe = service.embed
    tok = service.tokenizer
    vocab = min(len(tok), int(service.config.vocab_size))
    encoded = []
    for i, ids in enumerate(ids_lists):
        if not ids:
            raise HTTPError(422, f"input[{i}]: empty list of token ids", param="input")
        for token in ids:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                raise HTTPError(422, f"input[{i}]: token id {token!r} is not in the vocabulary (0..{vocab - 1})", param="input")
        if len(ids) + 2 > pipe.max_length:
            raise HTTPError(
                413, f"input[{i}]: {len(ids) + 2} tokens with [CLS] and [SEP], more than the model takes "
                f"({pipe.max_length})", param="input",
            )  # fmt: skip
        row = [tok.cls_token_id, *ids, tok.sep_token_id]
        encoded.append(Encoded([Row(row, [0] * len(row))]))
    return _prepare(service, pipe, [None] * len(encoded), params, encoded=encoded, tag="ids")


async def route_openai_embeddings(service: Service, body: dict[str, Any]) -> Any:
    """OpenAI ``/v1/embeddings``: unit-length vectors (as OpenAI's), float or base64 (little-endian float32)."""
    _unknown_fields(body, {"input", "model", "encoding_format", "dimensions", "user"})
    inputs = _field(body, "input", (str, list))
    _field(body, "model", str, None)
    encoding = _field(body, "encoding_format", str, "float")
    if encoding not in ("float", "base64"):
        raise HTTPError(422, f"encoding_format: expected 'float' or 'base64', got {encoding!r}", param="encoding_format")
    dimensions = _field(body, "dimensions", int, None)
    hidden = int(service.config.hidden_size)
    if dimensions is not None and dimensions != hidden:
        raise HTTPError(422, f"dimensions: this model gives {hidden}-dimensional vectors, got {dimensions}", param="dimensions")
    params = _embed_params(service, True, False)
    if isinstance(inputs, list) and inputs and all(isinstance(x, int) and not isinstance(x, bool) for x in inputs):
        inputs = [inputs]  # one text as token ids
    items = _as_batch(service, inputs, "input", isinstance(inputs, str))
    if all(isinstance(x, str) for x in items):
        job = await _in_thread(_prepare, service, service.embed, items, params)
    elif all(isinstance(x, list) for x in items):
        job = _ids_job(service, items, params)
    else:
        raise HTTPError(422, "input: expected a string, a list of strings, or token ids (a list of integers or of lists of them)",
                        param="input")  # fmt: skip
    vectors = await _run(service, job)
    data = []
    for index, vector in enumerate(vectors):
        embedding: Any = vector
        if encoding == "base64":
            embedding = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = job.tokens
    return {"object": "list", "data": data, "model": body.get("model") or service.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip


async def route_predict(service: Service, body: dict[str, Any]) -> Any:
    """TEI ``/predict``: ``inputs`` a text, or a list of texts / ``[text, text_pair]`` pairs; every label, best first.

    A list is always a batch: give one pair as ``[["a", "b"]]``. ``raw_scores``: logits instead of
    the model's score function (softmax, sigmoid or none, from its config).
    """
    pipe = service.pipelines.get("text-classification")
    if pipe is None:
        raise _missing_head(service, "/predict", "sequence-classification head")
    _unknown_fields(body, {"inputs", "raw_scores", "truncate", "truncation_direction"})
    inputs = _field(body, "inputs", (str, list))
    raw = _field(body, "raw_scores", bool, False)
    truncate = _field(body, "truncate", bool, False)
    single = isinstance(inputs, str)
    items = _as_batch(service, inputs, "inputs", single)
    params: dict[str, Any] = {"top_k": None, "truncation": truncate}
    if raw:
        params["function_to_apply"] = "none"
    job = await _in_thread(_prepare, service, pipe, items, params)
    results = await _run(service, job)
    return results[0] if single else results


async def route_rerank(service: Service, body: dict[str, Any]) -> Any:
    """TEI ``/rerank``: ``query``, ``texts``; ``[{index, score, text?}]`` by score, best first.

    Scores are the 1-label classifier's logit through a sigmoid (``raw_scores``: the logit).
    """
    pipe = service.pipelines.get("text-classification")
    if pipe is None or int(service.config.num_labels) != 1:
        what = "1-label sequence-classification head (a reranker)"
        if pipe is not None:
            what += f"; its classifier has {service.config.num_labels} labels"
        raise _missing_head(service, "/rerank", what)
    _unknown_fields(body, {"query", "texts", "return_text", "raw_scores", "truncate", "truncation_direction"})
    query = _field(body, "query", str)
    texts = _field(body, "texts", list)
    return_text = _field(body, "return_text", bool, False)
    raw = _field(body, "raw_scores", bool, False)
    truncate = _field(body, "truncate", bool, False)
    texts = _as_batch(service, texts, "texts", False)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise HTTPError(422, f"texts[{i}]: expected a string, got {type(text).__name__}", param="texts")
    params = {"top_k": 1, "truncation": truncate, "function_to_apply": "none" if raw else "sigmoid"}
    job = await _in_thread(_prepare, service, pipe, [[query, text] for text in texts], params)
    results = await _run(service, job)
    ranked = sorted(range(len(texts)), key=lambda i: -results[i]["score"])
    return [
        {"index": i, "score": results[i]["score"], **({"text": texts[i]} if return_text else {})} for i in ranked
    ]


async def route_tokenize(service: Service, body: dict[str, Any]) -> Any:
    """TEI ``/tokenize``: per input, its tokens ``{id, text, special, start, stop}`` (character offsets)."""
    _unknown_fields(body, {"inputs", "add_special_tokens", "prompt_name"})
    inputs = _field(body, "inputs", (str, list))
    add_special = _field(body, "add_special_tokens", bool, True)
    items = _as_batch(service, inputs, "inputs", isinstance(inputs, str))
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise HTTPError(422, f"inputs[{i}]: expected a string, got {type(item).__name__}", param="inputs")

    def tokenize() -> list[list[dict[str, Any]]]:
        encoding = service.embed.call_tokenizer(
            items, add_special_tokens=add_special, return_offsets_mapping=True, return_special_tokens_mask=True,
            return_token_type_ids=False, return_attention_mask=False,
        )  # fmt: skip
        out = []
        for text, ids, offsets, special in zip(
            items, encoding["input_ids"], encoding["offset_mapping"], encoding["special_tokens_mask"]
        ):
            tokens = service.tokenizer.convert_ids_to_tokens(ids)
            out.append([
                {"id": i, "text": token if s else text[a:b], "special": bool(s), "start": None if s else a, "stop": None if s else b}
                for i, token, (a, b), s in zip(ids, tokens, offsets, special)
            ])  # fmt: skip
        return out

    return await _in_thread(tokenize)


async def route_decode(service: Service, body: dict[str, Any]) -> Any:
    """TEI ``/decode``: ``ids`` (a list of ids, or a list of such lists) to texts (always a list)."""
    _unknown_fields(body, {"ids", "skip_special_tokens"})
    ids = _field(body, "ids", list)
    skip = _field(body, "skip_special_tokens", bool, True)
    rows = [ids] if not ids or not isinstance(ids[0], list) else ids
    rows = _as_batch(service, rows, "ids", False)
    vocab = len(service.tokenizer)
    for i, row in enumerate(rows):
        if not isinstance(row, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in row):
            raise HTTPError(422, f"ids[{i}]: expected a list of token ids in 0..{vocab - 1}", param="ids")
    return [service.tokenizer.decode(row, skip_special_tokens=skip) for row in rows]


def _head_route(route: str) -> Callable[[Service, dict[str, Any]], Any]:
    """A megabert head route: ``{"inputs": one input or a list, "parameters": {...}, "truncate"}``.

    Inputs and parameters are the pipeline's own (see its class docstring); a pair is a
    two-item list or ``{"text", "text_pair"}``. One input gives one result, a list a list.
    """
    key = HEAD_ROUTES[route]

    async def handler(service: Service, body: dict[str, Any]) -> Any:
        pipe = service.pipelines.get(key)
        if pipe is None:
            raise _missing_head(service, route, f"{key} head")
        _unknown_fields(body, {"inputs", "parameters", "truncate"})
        inputs = _field(body, "inputs", (str, list, dict))
        params = dict(_field(body, "parameters", dict, {}))
        truncate = _field(body, "truncate", bool, None)
        if truncate is not None:
            if "truncation" not in pipe.call_defaults:
                raise HTTPError(422, f"truncate: {route} does not truncate (long inputs are read in windows)", param="truncate")
            params["truncation"] = truncate
        # JSON has no tuples: a top-level pair is a two-string list for the pair-only pipeline.
        probe = tuple(inputs) if key == "next-sentence" and isinstance(inputs, list) and len(inputs) == 2 and all(
            isinstance(x, str) for x in inputs) else inputs  # fmt: skip
        single = pipe._is_single(probe)
        items = _as_batch(service, inputs, "inputs", single)
        job = await _in_thread(_prepare, service, pipe, items, params)
        results = await _run(service, job)
        return results[0] if single else results

    return handler


ROUTES: dict[str, Callable[[Service, dict[str, Any]], Any]] = {
    "/embed": route_embed,
    "/v1/embeddings": route_openai_embeddings,
    "/predict": route_predict,
    "/rerank": route_rerank,
    "/tokenize": route_tokenize,
    "/decode": route_decode,
    **{route: _head_route(route) for route in HEAD_ROUTES},
}


def info(service: Service) -> dict[str, Any]:
    """``/info``: the model, a config summary, dtype, device, limits, routes and version."""
    from megabert import __version__

    config = service.config
    pipe = service.embed
    summary = {
        name: getattr(config, name, None)
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "vocab_size", "num_labels", "problem_type")
    }  # fmt: skip
    summary["architectures"] = config.architectures
    if "text-classification" in service.pipelines or "token-classification" in service.pipelines:
        summary["id2label"] = {str(k): v for k, v in config.id2label.items()}
    return {
        "model_id": service.name,
        "model_type": service.model_task,
        "heads": service.heads,
        "routes": service.available(),
        "config": summary,
        "dtype": str(next(pipe.model.parameters()).dtype).replace("torch.", ""),
        "device": str(pipe.device),
        "pooling": service.pooling,
        "max_input_length": pipe.max_length,
        "limits": {
            "max_batch_tokens": service.limits.max_batch_tokens,
            "max_batch_requests": service.limits.max_batch_requests,
            "max_concurrent_requests": service.limits.max_concurrent_requests,
            "max_client_batch_size": service.limits.max_client_batch_size,
            "max_body_bytes": service.limits.max_body_bytes,
            "request_timeout": service.limits.request_timeout,
        },
        "version": __version__,
    }


# ----------------------------------------------------------------------------- the app
def warm_up(service: Service) -> None:
    """Run one tiny batch through the batcher (the first forward pass is slow); then /health says ok."""
    job = _prepare(service, service.embed, ["warm up"], _embed_params(service, False, False))
    service.batcher.submit(job).result()  # type: ignore[union-attr]
    service.batcher.arm_test_hooks()  # type: ignore[union-attr]
    service.ready = True
    logger.info("ready: %s on %s", service.name, service.embed.device)


def build_app(service: Service) -> Any:
    """The FastAPI app over ``service`` (its batcher is started here; call :func:`warm_up` after)."""
    from fastapi import FastAPI, Request, Response

    if service.metrics is None:
        service.metrics = Metrics()
    if service.batcher is None:
        service.batcher = Batcher(
            service.limits.max_batch_tokens, service.limits.max_batch_requests, metrics=service.metrics,
            incoming=lambda: service.preparing,
        )  # fmt: skip
        service.batcher.start()
    metrics = service.metrics
    app = FastAPI(title="megabert serve", docs_url=None, redoc_url=None, openapi_url=None)
    expected = f"Bearer {service.api_key}".encode() if service.api_key else None

    @app.middleware("http")
    async def gate(request: Request, call_next: Callable[..., Any]) -> Any:
        """Auth, draining, the concurrency limit, the access log and request metrics, for every route."""
        start = time.perf_counter()
        path = request.url.path
        label = path if path in ALL_ROUTES else "other"
        openai = path.startswith("/v1/")
        counted = False
        call = None
        try:
            if service.draining and path != "/health":
                raise HTTPError(503, "the server is shutting down", error_type="Unhealthy", headers={"Connection": "close"})
            if expected is not None and path != "/health":
                given = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(given, expected):
                    raise HTTPError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                    error_type="Unauthorized", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
            if path in INFERENCE_ROUTES:
                if service.in_flight >= service.limits.max_concurrent_requests:
                    raise HTTPError(
                        429, f"too many concurrent requests (--max-concurrent-requests "
                        f"{service.limits.max_concurrent_requests}); retry shortly",
                        error_type="Overloaded", headers={"Retry-After": "1"},
                    )  # fmt: skip
                service.in_flight += 1  # one event loop: no lock needed
                counted = True
                call = _Call()
                call.preparing = True
                service.preparing += 1
                _CALL.set(call)
            response = await call_next(request)
        except HTTPError as exc:
            response = _error_response(exc, openai)
        finally:
            if counted:
                service.in_flight -= 1
            if call is not None:
                call.queued(service)  # answered before it was queued (an error): no longer incoming
        seconds = time.perf_counter() - start
        metrics.requests.labels(label, str(response.status_code)).inc()
        metrics.request_seconds.labels(label).observe(seconds)
        client = request.client.host if request.client else "-"
        access_logger.info('%s "%s %s" %d %.1fms', client, request.method, path, response.status_code, seconds * 1000)
        return response

    @app.get("/health")
    async def health() -> Any:
        if service.draining:
            return _json_response({"status": "shutting down"}, 503)
        if not service.ready:
            return _json_response({"status": "loading"}, 503)
        return _json_response({"status": "ok"})

    @app.get("/info")
    async def get_info() -> Any:
        return _json_response(info(service))

    @app.get("/metrics")
    async def get_metrics() -> Any:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def make_endpoint(path: str, handler: Callable[[Service, dict[str, Any]], Any]) -> Callable[..., Any]:
        openai = path.startswith("/v1/")

        async def endpoint(request: Request) -> Any:
            call = _CALL.get()
            if call is not None:
                call.request = request  # _run watches it for a disconnect
            try:
                if not service.ready:
                    raise HTTPError(503, "the model is still loading", error_type="Unhealthy", headers={"Retry-After": "1"})
                body = await _read_body(request, service.limits.max_body_bytes)
                return _json_response(await handler(service, body))
            except ClientGone:  # nobody reads this answer (nginx's 499)
                return _json_response({"error": "client closed the connection", "error_type": "ClientClosed"}, 499)
            except HTTPError as exc:
                return _error_response(exc, openai)
            except UserError as exc:  # the pipelines' checks (InputError names the input)
                message = " ".join(str(exc).split())
                # The pipelines word the way out for Python and the CLI; here it is a body field.
                message = message.replace("turn on truncation (truncation=True, --truncate)", 'send "truncate": true')
                return _error_response(HTTPError(422, message), openai)
            except BatchError as exc:
                return _error_response(HTTPError(500, str(exc), error_type="Backend"), openai)
            except Exception as exc:  # a bug: still one line of JSON, the traceback to the log only
                logger.exception("%s failed", path)
                reason = " ".join(str(exc).split())
                return _error_response(HTTPError(500, f"internal error: {type(exc).__name__}: {reason}", error_type="Backend"), openai)

        endpoint.__name__ = "route_" + path.strip("/").replace("/", "_").replace("-", "_")
        return endpoint

    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def routing_error(request: Request, exc: StarletteHTTPException) -> Any:
        """Unknown paths and wrong methods: the same JSON error shape as every other error."""
        path = request.url.path
        if exc.status_code == 404:
            message = f"{path}: no such route (this model answers {', '.join(service.available())}; GET /health /info /metrics)"
        elif exc.status_code == 405:
            message = f"{path}: method {request.method} not allowed ({'GET' if path in ('/health', '/info', '/metrics') else 'POST'})"
        else:
            message = f"{path}: {exc.detail}"
        kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "Validation")
        return _error_response(HTTPError(exc.status_code, message, error_type=kind, headers=dict(exc.headers or {})),
                               path.startswith("/v1/"))  # fmt: skip

    app.add_exception_handler(StarletteHTTPException, routing_error)
    for path, handler in ROUTES.items():
        # A plain Starlette route: the handlers parse and check the body themselves (errors that
        # name the field, in TEI's shape), so FastAPI's signature-based parsing is not wanted.
        app.router.add_route(path, make_endpoint(path, handler), methods=["POST"])
    return app


__all__ = ["HTTPError", "Limits", "Metrics", "Service", "build_app", "info", "load_service", "warm_up"]
