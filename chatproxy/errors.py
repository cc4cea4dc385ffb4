"""One error type and the JSON handlers that turn every failure into the error contract."""

from __future__ import annotations

import logging

from flask import Flask, Response, g, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}

_HTTP_MESSAGES = {
    404: "There is nothing at this address.",
    405: "This method is not allowed here.",
    413: "The request body is too large.",
    415: "Send the body as application/json.",
}


class ApiError(Exception):
    """A failure with a status, a snake_case code and a sentence safe to show the client."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def body(self) -> dict:
        """The contract's JSON body."""
        error = {"code": self.code, "message": self.message}
        request_id = g.get("request_id") if g else None
        if request_id:
            error["request_id"] = request_id
        return {"error": error}

    def response(self) -> Response:
        """A JSON response carrying this error."""
        response = jsonify(self.body())
        response.status_code = self.status
        if self.retry_after is not None:
            response.headers["Retry-After"] = str(self.retry_after)
        return response


def invalid(message: str) -> ApiError:
    """A 400 invalid_request with `message`."""
    return ApiError(400, "invalid_request", message)


def init_app(app: Flask) -> None:
    """Register handlers so no failure leaves the app as HTML or a stack trace."""

    @app.errorhandler(ApiError)
    def _api_error(error: ApiError) -> Response:
        return error.response()

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        if isinstance(error.response, Response):  # already in the contract's shape (e.g. the rate limiter's)
            return error.response
        status = error.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        message = _HTTP_MESSAGES.get(status) or (error.description or "The request failed.")
        response = ApiError(status, code, message).response()
        valid_methods = getattr(error, "valid_methods", None)
        if valid_methods:
            response.headers["Allow"] = ", ".join(valid_methods)
        return response

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        log.exception("unhandled error")
        return ApiError(500, "internal_error", "Something went wrong on our side. Try again.").response()
