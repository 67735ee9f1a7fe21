"""API errors: one exception type that carries an HTTP status and the OpenAI error body
`{"error": {"message", "type", "param", "code"}}`; every refusal of the API is one of them.

The message names the field at fault with its JSON path (`messages[0].content[1].image_url.url`)
and `param` holds that path, as OpenAI's API does.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False)  # an exception keeps identity equality and hashing
class ApiError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str = "invalid_request_error"

    def __post_init__(self):
        super().__init__(self.message)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(param: str | None, message: str, code: str | None = "invalid_value") -> ApiError:
    """A 400 whose message starts with the field it is about."""
    text = f"{param}: {message}" if param else message
    return ApiError(400, text, param, code)


def too_large(message: str, param: str | None = None) -> ApiError:
    return ApiError(413, message, param, "payload_too_large")


def unauthorized() -> ApiError:
    return ApiError(401, "missing or wrong API key: send it as the header 'Authorization: Bearer KEY'",
                    None, "invalid_api_key", "authentication_error")


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, None, "service_unavailable", "server_error")


def not_found(message: str, param: str | None = None, code: str = "not_found") -> ApiError:
    return ApiError(404, message, param, code)
