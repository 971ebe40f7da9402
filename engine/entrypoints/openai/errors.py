"""OpenAI-style error bodies, `{"error": {"message", "type", "param", "code"}}`, for every failure.

Invalid input of any kind (pydantic validation, malformed JSON, an engine
ValueError) is a 400 naming the parameter where it can be told; nothing a
client sends produces a 422 or a 500.
"""

from __future__ import annotations

import logging
import re
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)

# Engine messages about the prompt's token ids concern the request's prompt.
_PARAM_ALIASES = {"prompt_token_ids": "prompt"}


class OpenAIError(Exception):
    """An error the server answers with `status_code` and an OpenAI error body."""

    def __init__(self, status_code: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code


def bad_request(message: str, param: Optional[str] = None) -> OpenAIError:
    return OpenAIError(400, message, param)


def invalid_value(err: ValueError, fields: set[str]) -> OpenAIError:
    """A 400 for a ValueError whose message starts with the name of the field at fault."""
    message = str(err)
    match = re.match(r"[A-Za-z_]+", message)
    name = _PARAM_ALIASES.get(match.group(0), match.group(0)) if match else None
    return bad_request(message, name if name in fields else None)


def error_response(status_code: int, message: str, param: Optional[str] = None,
                   code: Optional[str] = None) -> JSONResponse:
    error_type = "server_error" if status_code >= 500 else "invalid_request_error"
    return JSONResponse(status_code=status_code, content={"error": {
        "message": message, "type": error_type, "param": param, "code": code}})


def error_event(err: Exception) -> str:
    """The SSE event reporting an error that happened after a stream had started."""
    status = err.status_code if isinstance(err, OpenAIError) else 500
    return f"data: {error_response(status, str(err)).body.decode()}\n\n"


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
        return error_response(exc.status_code, exc.message, exc.param, exc.code)

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
        logger.exception("internal error while serving a request", exc_info=exc)
        return error_response(500, f"internal server error: {type(exc).__name__}")
