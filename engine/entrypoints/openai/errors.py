"""OpenAI-style error bodies, `{"error": {"message", "type", "param", "code"}}`, for every failure.

Invalid input of any kind (pydantic validation, malformed JSON, an engine
ValueError) is a 400 naming the parameter where it can be told; nothing a
client sends produces a 422 or a 500. A full waiting queue is a 503 with
Retry-After, a server shutting down a 503; a request that fails inside the
engine is a 500 saying why, and fails alone.
"""

from __future__ import annotations

import logging
import re
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from engine.admission import EngineOverloadedError
from engine.async_engine import EngineShutdownError

logger = logging.getLogger(__name__)

# Engine messages about the prompt's token ids concern the request's prompt.
_PARAM_ALIASES = {"prompt_token_ids": "prompt"}
#: seconds an overloaded server asks clients to wait before retrying
RETRY_AFTER_S = 1


class OpenAIError(Exception):
    """An error the server answers with `status_code` and an OpenAI error body."""

    def __init__(self, status_code: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def bad_request(message: str, param: Optional[str] = None) -> OpenAIError:
    return OpenAIError(400, message, param)


def invalid_value(err: ValueError, fields: set[str]) -> OpenAIError:
    """A 400 for a ValueError whose message starts with the name of the field at fault."""
    message = str(err)
    match = re.match(r"[A-Za-z_]+", message)
    name = _PARAM_ALIASES.get(match.group(0), match.group(0)) if match else None
    return bad_request(message, name if name in fields else None)


def as_openai_error(err: Exception) -> OpenAIError:
    """The status and body an exception from serving a request is answered with."""
    if isinstance(err, OpenAIError):
        return err
    if isinstance(err, EngineOverloadedError):
        return OpenAIError(503, str(err), code="overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(err, EngineShutdownError):
        return OpenAIError(503, str(err), code="shutting_down")
    return OpenAIError(500, f"the request failed: {type(err).__name__}: {err}")


def error_response(status_code: int, message: str, param: Optional[str] = None,
                   code: Optional[str] = None,
                   headers: Optional[dict[str, str]] = None) -> JSONResponse:
    error_type = "server_error" if status_code >= 500 else "invalid_request_error"
    return JSONResponse(status_code=status_code, headers=headers, content={"error": {
        "message": message, "type": error_type, "param": param, "code": code}})


def error_event(err: Exception) -> str:
    """The SSE event reporting an error that happened after a stream had started."""
    error = as_openai_error(err)
    body = error_response(error.status_code, error.message, error.param, error.code).body
    return f"data: {body.decode()}\n\n"


def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if errors and errors[0]["type"] == "json_invalid":
        reason = errors[0].get("ctx", {}).get("error", errors[0]["msg"])
        return error_response(400, f"the request body is not valid JSON: {reason}")
    # loc is ("body", field, ...) for a bad field, ("body",) for a missing body.
    first_loc = [str(part) for part in errors[0]["loc"][1:]] if errors else []
    param = first_loc[0] if first_loc and not first_loc[0].isdigit() else None
    details = []
    for error in errors[:3]:
        where = ".".join(str(part) for part in error["loc"][1:])
        details.append(f"{where}: {error['msg']}" if where else error["msg"])
    return error_response(400, "; ".join(details) or "invalid request", param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(request, exc)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(ValueError)
    async def value_error(_: Request, exc: ValueError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        error = as_openai_error(exc)
        if error.status_code >= 500 and error.code is None:
            logger.exception("a request failed", exc_info=exc)
        return error_response(error.status_code, error.message, error.param, error.code,
                              error.headers)
