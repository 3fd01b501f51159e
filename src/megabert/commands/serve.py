"""`megabert serve MODEL`: an HTTP server with dynamic batching (TEI- and OpenAI-compatible routes)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from typing import Any

from megabert.errors import UserError

EPILOG = """\
examples:
  megabert serve my-model                                   # http://127.0.0.1:8080
  megabert serve sst2-model --port 9000 --api-key "$KEY" --device cuda --dtype bfloat16
  curl -s 127.0.0.1:8080/embed -H 'content-type: application/json' -d '{"inputs": ["a text"]}'

routes: POST /embed /predict /rerank /tokenize /decode (TEI), POST /v1/embeddings (OpenAI),
  POST /fill-mask /token-classification /question-answering /next-sentence /multiple-choice
  (the model's heads; others give 404), GET /health /info /metrics.
Requests are queued and batched by --max-batch-tokens; one worker runs the model.
needs: pip install 'megabert[serve]' (fastapi, uvicorn, prometheus_client).
"""

INSTALL_HINT = "megabert serve needs fastapi, uvicorn and prometheus_client: pip install 'megabert[serve]'"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` subcommand."""
    parser = subparsers.add_parser(
        "serve",
        help="an HTTP server over the model's pipelines (embeddings, classification, heads)",
        description="Serve a model folder over HTTP: TEI-compatible /embed, /predict, /rerank, /tokenize, "
        "/decode, OpenAI-compatible /v1/embeddings, and a route per megabert head, with dynamic batching.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="model folder (config.json, weights and tokenizer files)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument("--device", default=None, metavar="DEV", help="cpu, cuda, cuda:1... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16", "auto"), help="weights dtype (default float32)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on every route but /health (default: $MEGABERT_API_KEY)")  # fmt: skip
    parser.add_argument("--pooling", default="mean", choices=("mean", "cls", "pooler"), help="one vector per text for the embedding routes (default mean)")
    parser.add_argument("--max-batch-tokens", type=int, default=16384, metavar="N", help="tokens per batch (default 16384)")
    parser.add_argument("--max-batch-requests", type=int, default=None, metavar="N", help="requests per batch (default: no limit)")
    parser.add_argument("--max-concurrent-requests", type=int, default=512, metavar="N",
                        help="requests in flight before answering 429 (default 512)")  # fmt: skip
    parser.add_argument("--max-client-batch-size", type=int, default=32, metavar="N", help="inputs per request (default 32)")
    parser.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024, metavar="N",
                        help="largest request body, checked before parsing: 413 beyond (default 2097152, 2 MiB)")  # fmt: skip
    parser.add_argument("--request-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="time a request may wait in the queue and the model before a 503; a request not "
                        "started by then is dropped from the queue (default 60; 0: no limit)")  # fmt: skip
    parser.add_argument("--drain-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="on SIGTERM, how long to wait for the requests in flight (default 60)")  # fmt: skip
    parser.set_defaults(run=run)


def _check_positive(args: argparse.Namespace) -> None:
    for name in ("max_batch_tokens", "max_concurrent_requests", "max_client_batch_size", "max_batch_requests", "max_body_bytes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    for name in ("request_timeout", "drain_timeout"):
        value = getattr(args, name)
        if not value >= 0 or value == float("inf"):
            raise UserError(f"--{name.replace('_', '-')} must be a number of seconds >= 0, got {value}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is a one-line error, not a log dump."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and without
    # it Nagle's algorithm holds the body that follows the headers for the client's delayed ACK
    # (~40 ms on every response).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _draining_server(uvicorn: Any, config: Any, service: Any, drain_timeout: float) -> Any:
    """A uvicorn.Server whose first SIGTERM/SIGINT starts a drain instead of closing the socket.

    uvicorn's own shutdown stops accepting at once, so a client that connects during the drain
    gets "connection refused". Here the server keeps listening and answers every new request 503
    (JSON, ``Connection: close``; the ``draining`` flag, see Service.draining) until the requests
    in flight and in the queue are answered (or ``drain_timeout`` passes), then shuts down as
    uvicorn does. A second signal exits at once (uvicorn's own behaviour).
    """

    class DrainingServer(uvicorn.Server):
        draining = False
        drain_started = 0.0

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.draining:
                super().handle_exit(sig, frame)
                self.force_exit = True
                return
            self._captured_signals.append(sig)  # re-raised once serving ends: Terminated, exit 0
            self.draining = True
            self.drain_started = time.monotonic()

        async def on_tick(self, counter: int) -> bool:
            if self.draining and not self.should_exit:
                if service.idle or time.monotonic() - self.drain_started > drain_timeout:
                    self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer(config)


def run(args: argparse.Namespace) -> int:
    """Load the model, start the batcher and the server; SIGTERM drains in-flight requests and exits 0."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ModuleNotFoundError:
        raise UserError(INSTALL_HINT) from None
    from megabert.cli import Terminated
    from megabert.serving.app import Limits, build_app, load_service, warm_up

    _check_positive(args)
    api_key = args.api_key or os.environ.get("MEGABERT_API_KEY") or None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    limits = Limits(
        max_batch_tokens=args.max_batch_tokens, max_batch_requests=args.max_batch_requests,
        max_concurrent_requests=args.max_concurrent_requests, max_client_batch_size=args.max_client_batch_size,
        max_body_bytes=args.max_body_bytes, request_timeout=args.request_timeout or None,
    )  # fmt: skip
    service = load_service(args.model, device=args.device, dtype=args.dtype, pooling=args.pooling, limits=limits, api_key=api_key)
    sock = _listen(args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"megabert serve: warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)  # fmt: skip
    app = build_app(service)
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=int(args.drain_timeout) + 1
    )
    server = _draining_server(uvicorn, config, service, args.drain_timeout)
    service.server = server

    def warm() -> None:
        try:
            warm_up(service)
        except Exception as exc:  # the server stays up but unhealthy (/health 503): say why
            logging.getLogger("megabert.serve").error("warm-up failed: %s: %s", type(exc).__name__, exc)

    threading.Thread(target=warm, name="megabert-warm-up", daemon=True).start()
    print(f"megabert serve: {service.name} on http://{args.host}:{sock.getsockname()[1]} "
          f"(routes: {', '.join(service.available())})", file=sys.stderr, flush=True)  # fmt: skip
    try:
        # SIGTERM/SIGINT starts the drain (503 to new requests, see _draining_server); once the
        # requests in flight are answered uvicorn stops, then re-raises the signal once its
        # handlers are gone: megabert's own handler turns that into Terminated, which here
        # means "drained": exit 0.
        server.run(sockets=[sock])
    except Terminated:
        pass
    finally:
        service.batcher.stop(timeout=60)  # type: ignore[union-attr]
        sock.close()
    print("megabert serve: stopped", file=sys.stderr)
    return 0
