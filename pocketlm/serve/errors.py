"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and the app's exception
handlers. What a client got wrong is a 4xx naming the field; anything unexpected becomes a JSON 500
that says nothing of the internals, its traceback logged here (see guard.Guard for the last resort)."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("pocketlm.serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers


def error_body(message: str, type: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None,
                   headers=None) -> Response:
    # json.dumps escapes non-ASCII, so a message quoting a client's (possibly unencodable) text still renders
    return Response(json.dumps(error_body(message, type, param, code)), status, headers=headers,
                    media_type="application/json")


def internal_error() -> Response:
    return error_response(500, "internal server error (logged on the server)", type="server_error")


def _validation_error(request, e: RequestValidationError):
    errors = e.errors()
    first = errors[0]
    if first.get("type") == "json_invalid":
        return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(),
                              code="invalid_json")
    if tuple(first.get("loc", ())) == ("body",) and not isinstance(first.get("input"), (dict, list)):
        return error_response(400, "the body must be a JSON object, sent with Content-Type: application/json",
                              code="invalid_json")

    # the deepest location first: of a union's failed branches, the one that got furthest is the one meant
    errors = sorted(errors, key=lambda err: -len(_where(err)))
    message = "; ".join(f"{'.'.join(_where(err)) or 'body'}: {err.get('msg')}" for err in errors[:5])
    return error_response(422, message, param=".".join(_where(errors[0])) or None, code="invalid_value")


def _where(err) -> list[str]:
    """A field's path as a client wrote it: messages.0.content, not pydantic's
    body.messages.0.content.function-after[_encodable(), str] (the union branch it tried)."""
    return [str(p) for p in err.get("loc", ()) if p != "body" and not (isinstance(p, str) and (
        "[" in p or p in _BRANCHES))]


_BRANCHES = {"str", "int", "float", "bool", "list", "dict", "none",
             "TextPart", "ImagePart", "AudioPart"}  # the content-part union's branches (schemas.Message)


def _http_error(request, e: StarletteHTTPException):
    if e.status_code == 400:  # FastAPI could not read the body (not UTF-8, say)
        return error_response(400, f"the body could not be read as UTF-8 JSON ({e.detail})", code="invalid_json")
    codes = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout", 413: "request_too_large"}
    return error_response(e.status_code, str(e.detail), code=codes.get(e.status_code), headers=e.headers)


def install(app: FastAPI) -> None:
    async def api_error(request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    async def validation_error(request, e):
        return _validation_error(request, e)

    async def http_error(request, e):
        return _http_error(request, e)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
