"""Errors as OpenAI shapes them: `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status.

Every refusal the server makes is an `ApiError` raised where the problem is found; the app turns it
into the response, so no handler builds an error body by hand and bad input can never become a 500.
"""

from __future__ import annotations

import dataclasses

# OpenAI's `type` per status; 503 follows llama-server ("unavailable_error").
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          503: "unavailable_error"}


@dataclasses.dataclass(eq=False)  # an exception: compared and hashed by identity
class ApiError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict | None = None

    def __post_init__(self):
        super().__init__(self.message)

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)
