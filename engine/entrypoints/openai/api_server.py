"""The OpenAI-compatible HTTP server: FastAPI app factory and uvicorn runner.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
GET /health, GET /version, GET /metrics. With an API key, every /v1 route
wants `Authorization: Bearer <key>`; health, version and metrics stay open for
probes and scrapers.

Graceful shutdown: on SIGTERM (or SIGINT) the server stops listening, the
engine refuses new requests (503) and /health turns 503, requests in flight run
on for up to `shutdown_timeout` seconds, then those left fail with a clean
error (a 503 body, or an error event ending the stream); the process exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import logging
import secrets
import signal
import threading
from typing import Optional

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.async_engine import AsyncLLMEngine
from engine.config import EngineConfig
from engine.entrypoints.openai.errors import error_response, install_error_handlers
from engine.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, \
    ModelCard, ModelList
from engine.entrypoints.openai.serving_chat import OpenAIServingChat
from engine.entrypoints.openai.serving_completions import OpenAIServingCompletion
from engine.metrics import CONTENT_TYPE_LATEST, ServerMetrics

logger = logging.getLogger(__name__)


class APIKeyMiddleware:
    """401 for /v1 requests without `Authorization: Bearer <api_key>`.

    Plain ASGI rather than BaseHTTPMiddleware, which would get between a
    streaming response and the client's disconnect.
    """

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not secrets.compare_digest(given, self.expected):
                response = error_response(401, "invalid or missing API key: send it as "
                                               "'Authorization: Bearer <key>'",
                                          code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(engine: AsyncLLMEngine, served_model_names: list[str],
              api_key: Optional[str] = None) -> FastAPI:
    """An app serving `engine` under `served_model_names` (the first one answers).

    Its metrics live in a registry of their own and follow the engine while
    the app runs (from lifespan startup to shutdown).
    """
    if not served_model_names:
        raise ValueError("served_model_names must name at least one model")
    metrics = ServerMetrics(served_model_names[0])

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.add_step_listener(metrics.observe)
        try:
            yield
        finally:
            engine.remove_step_listener(metrics.observe)

    app = FastAPI(title="pagedllm", version=_version(), lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    completions = OpenAIServingCompletion(engine, served_model_names)
    chat = OpenAIServingChat(engine, served_model_names)
    _add_routes(app, engine, served_model_names, metrics, completions, chat)
    return app


def _add_routes(app: FastAPI, engine: AsyncLLMEngine, served_model_names: list[str],
                metrics: ServerMetrics, completions: OpenAIServingCompletion,
                chat: OpenAIServingChat) -> None:
    @app.get("/health")
    async def health() -> Response:
        if not engine.is_accepting:
            return error_response(503, "the engine is not running or is shutting down")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": _version()})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        cards = [ModelCard(id=name, root=engine.config.model,
                           max_model_len=engine.config.max_model_len)
                 for name in served_model_names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        return await completions.create_completion(request, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest,
                                     raw_request: Request) -> Response:
        return await chat.create_chat_completion(request, raw_request)


def _version() -> str:
    return importlib.metadata.version("pagedllm")


class DrainingServer(uvicorn.Server):
    """uvicorn, whose first exit signal also starts draining the engine.

    uvicorn itself stops listening and waits for the open requests; the engine
    refuses new ones at once (requests on kept-alive connections included),
    and `shutdown_timeout` seconds later fails those still running, so that
    every response ends cleanly and the wait is bounded.
    """

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, shutdown_timeout: float):
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout
        self._deadline: Optional[threading.Timer] = None

    def handle_exit(self, sig, frame) -> None:
        if self._deadline is None:
            logger.info("signal %s: draining, at most %.1f s", sig, self.shutdown_timeout)
            self.engine.stop_accepting()
            self._deadline = threading.Timer(self.shutdown_timeout, self.engine.shutdown)
            self._deadline.daemon = True
            self._deadline.start()
        super().handle_exit(sig, frame)

    async def serve(self, sockets=None) -> None:
        try:
            await super().serve(sockets)
        finally:
            if self._deadline is not None:  # drained before the deadline
                self._deadline.cancel()


def run_server(args: argparse.Namespace) -> None:
    """Load the engine the flags describe, then serve it until a signal drains it."""
    from engine.cli import engine_kwargs
    from engine.model_loader import DEFAULT_MODEL

    if args.shutdown_timeout < 0:
        raise ValueError(f"shutdown_timeout must be >= 0, got {args.shutdown_timeout}")
    kwargs = engine_kwargs(args)
    kwargs["model"] = args.model_tag or args.model
    engine = AsyncLLMEngine.from_config(EngineConfig(**kwargs), args.max_num_waiting)
    served_model_names = args.served_model_name or [kwargs["model"] or DEFAULT_MODEL]
    try:
        app = build_app(engine, served_model_names, args.api_key)
        # Responses still open when uvicorn gives up are cut; the engine fails
        # them cleanly first, at shutdown_timeout.
        config = uvicorn.Config(app, host=args.host, port=args.port,
                                log_level=args.uvicorn_log_level,
                                timeout_graceful_shutdown=args.shutdown_timeout + 5)
        server = DrainingServer(config, engine, args.shutdown_timeout)
        with _signals_end_quietly():
            server.run()
    finally:
        engine.shutdown()


@contextlib.contextmanager
def _signals_end_quietly():
    """uvicorn re-raises the exit signal once it has shut down; by then the
    shutdown was graceful, so it must not kill the process (exit status 0)."""
    previous = {sig: signal.signal(sig, lambda *_: None)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
