"""JSON log lines carry text, not terminal colour codes."""

from __future__ import annotations

import json
import logging

import pytest
from werkzeug.serving import WSGIRequestHandler

from chatproxy.logs import JsonFormatter


@pytest.mark.parametrize("status, path", [(404, "/nope"), (500, "/api/chat"), (304, "/static/chat.js")])
def test_werkzeugs_coloured_request_lines_are_plain_text_in_json(caplog, status: int, path: str) -> None:
    handler = WSGIRequestHandler.__new__(WSGIRequestHandler)  # just enough of one to log a request line
    handler.client_address = ("127.0.0.1", 50000)
    handler.command, handler.path, handler.request_version = "GET", path, "HTTP/1.1"
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        handler.log_request(status)
    [record] = caplog.records
    assert "\x1b[" in record.getMessage()  # werkzeug colours it, whatever the output is

    line = JsonFormatter().format(record)

    assert "\\u001b" not in line and "\x1b" not in line
    assert json.loads(line)["message"].endswith(f'"GET {path} HTTP/1.1" {status} -')
