"""`pagedllm serve`: the OpenAI-compatible server (also `python -m engine.entrypoints.openai`).

Only argument definitions live here; FastAPI and uvicorn are imported when the
server starts, so other subcommands start fast.
"""

from __future__ import annotations

import argparse


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    from engine.cli import add_engine_args

    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="model directory (same as --model); default: "
                             "SmolLM2-135M-Instruct")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0: every interface)")
    server.add_argument("--port", type=int, default=8000, help="port to listen on")
    server.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="model name(s) the API answers to; default: MODEL")
    server.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1 routes")
    server.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    server.add_argument("--max-num-waiting", type=int, default=None, metavar="N",
                        help="most requests waiting to be scheduled; beyond it new requests "
                             "get 503 with Retry-After (default: no bound)")
    server.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM, how long requests in flight may run on before "
                             "they are failed and the server exits")
    add_engine_args(parser)


def add_serve_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over the OpenAI API: /v1/completions, "
                    "/v1/chat/completions, /v1/models, /health, /version, /metrics.")
    add_serve_args(parser)
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    from engine.entrypoints.openai.api_server import run_server

    run_server(args)
