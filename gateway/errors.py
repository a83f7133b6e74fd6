"""Errors in OpenAI's JSON shape, so clients' own error handling works unchanged.

`{"error": {"message", "type", "param", "code"}}`, with the HTTP status OpenAI would use.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from starlette.responses import Response

from greenroute.backends.base import BackendError


class APIError(Exception):
    """An error to answer with; raised anywhere in request handling."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    @classmethod
    def from_backend(cls, exc: BackendError) -> APIError:
        return cls(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self, headers: Mapping[str, str] | None = None) -> Response:
        return Response(orjson.dumps(self.body()), status_code=self.status,
                        media_type="application/json", headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def server_error(message: str = "The gateway hit an unexpected error.") -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")


def shutting_down() -> APIError:
    """The answer to a request still running when the server's shutdown grace ends."""
    return APIError(503, "The gateway is shutting down and could not finish this request in "
                         "time; retry it.", type="server_error", code="server_shutting_down")
