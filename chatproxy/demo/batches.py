"""The fake upstream's Files and Batch endpoints, wire-compatible with the `openai` SDK.

    POST /v1/files                 multipart upload (fields `file` and `purpose`); the bytes are kept
    GET  /v1/files/{id}            the FileObject
    GET  /v1/files/{id}/content    the bytes (input, output and error files alike)
    POST /v1/batches               validates the input file like OpenAI, then runs it in the background
    GET  /v1/batches/{id}          the Batch: validating, in_progress (request_counts rising), completed
    GET  /v1/batches               every batch, newest first (one page)

A batch completes `fake.batch_api.delay` seconds after it was created (default: 0.2 s, 3 s in the demo).
A request whose last user message contains "FAIL" fails: it lands in the error file with a 400
response, as OpenAI reports a failed line. A malformed input file makes the batch `failed` with
`errors`, as OpenAI's validation does.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from .answers import answer_for, completion, count_tokens, prompt_tokens, usage

FAIL_MARKER = "FAIL"
ENDPOINTS = frozenset({"/v1/chat/completions"})
# An endpoint of the fake besides /chat/completions: method, path pattern, handler(request handler, match, raw body).
Route = tuple[str, re.Pattern[str], Callable[[Any, re.Match[str], bytes], None]]


@dataclass
class FakeFile:
    """An uploaded or generated file."""

    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def as_json(self) -> dict[str, Any]:
        """The FileObject."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


@dataclass
class FakeBatch:
    """One batch: its input lines and, once finished, its output and error files."""

    id: str
    input_file_id: str
    endpoint: str
    created_at: float
    metadata: dict[str, str] | None
    lines: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed_at: int | None = None


class FakeBatchAPI:
    """The state behind the endpoints: files, batches and how long a batch takes."""

    def __init__(self, demo: bool) -> None:
        self.demo = demo
        self.delay = 3.0 if demo else 0.2  # seconds from creation to `completed`
        self.create_reply_delay = 0.0  # seconds between creating a batch and answering (a slow or lost reply)
        self.files: dict[str, FakeFile] = {}
        self.batches: dict[str, FakeBatch] = {}
        self.lock = threading.Lock()

    def add_file(self, filename: str, purpose: str, data: bytes) -> FakeFile:
        """Store a file and return it."""
        file = FakeFile(f"file-{secrets.token_hex(12)}", filename, purpose, data, int(time.time()))
        with self.lock:
            self.files[file.id] = file
        return file

    def create(self, body: dict[str, Any]) -> FakeBatch:
        """Create a batch; an input file OpenAI would refuse makes it `failed` with `errors`."""
        batch = FakeBatch(
            f"batch_{secrets.token_hex(12)}",
            str(body.get("input_file_id")),
            str(body.get("endpoint")),
            time.time(),
            body.get("metadata"),
        )
        with self.lock:
            file = self.files.get(batch.input_file_id)
        if body.get("completion_window") != "24h":
            batch.errors.append(_error("invalid_completion_window", "completion_window must be 24h."))
        elif batch.endpoint not in ENDPOINTS:
            batch.errors.append(_error("invalid_endpoint", f"Unsupported endpoint {batch.endpoint}."))
        elif file is None or file.purpose != "batch":
            batch.errors.append(_error("invalid_file", "The input file does not exist or is not for batch."))
        else:
            batch.lines, batch.errors = _parse_input(file.data, batch.endpoint)
        with self.lock:
            self.batches[batch.id] = batch
        return batch

    def view(self, batch: FakeBatch) -> dict[str, Any]:
        """The Batch object as of now; finishing the batch when its time has come."""
        elapsed = time.time() - batch.created_at
        total = len(batch.lines)
        if batch.errors:
            status, done = "failed", 0
        elif elapsed >= self.delay:
            self._finish(batch)
            status, done = "completed", total
        else:
            status, done = (
                ("validating", 0) if elapsed < self.delay / 10 else ("in_progress", int(total * elapsed / self.delay))
            )
        failed = sum(1 for line in batch.lines[:done] if _fails(line))
        created = int(batch.created_at)
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "input_file_id": batch.input_file_id,
            "completion_window": "24h",
            "status": status,
            "created_at": created,
            "expires_at": created + 86400,
            "in_progress_at": created if status != "failed" else None,
            "completed_at": batch.completed_at,
            "failed_at": created if status == "failed" else None,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
            "request_counts": {"total": total, "completed": done - failed, "failed": failed},
            "metadata": batch.metadata,
        }

    def _finish(self, batch: FakeBatch) -> None:
        with self.lock:
            if batch.completed_at is not None:
                return
            batch.completed_at = int(time.time())
        outputs, failures = [], []
        for line in batch.lines:
            (failures if _fails(line) else outputs).append(self._answer(line))
        if outputs:
            batch.output_file_id = self.add_file(f"{batch.id}_output.jsonl", "batch_output", _jsonl(outputs)).id
        if failures:
            batch.error_file_id = self.add_file(f"{batch.id}_error.jsonl", "batch_output", _jsonl(failures)).id

    def _answer(self, line: dict[str, Any]) -> dict[str, Any]:
        body = line["body"]
        entry: dict[str, Any] = {
            "id": f"batch_req_{secrets.token_hex(8)}",
            "custom_id": line["custom_id"],
            "error": None,
        }
        request_id = f"req_{secrets.token_hex(8)}"
        if _fails(line):
            error = {
                "message": "This request failed in the fake upstream.",
                "type": "invalid_request_error",
                "param": None,
                "code": "fake_failure",
            }
            entry["response"] = {"status_code": 400, "request_id": request_id, "body": {"error": error}}
            return entry
        text = answer_for(body, self.demo)
        entry["response"] = {
            "status_code": 200,
            "request_id": request_id,
            "body": completion(body, text, usage(prompt_tokens(body), count_tokens(text))),
        }
        return entry


def batch_routes(api: FakeBatchAPI) -> list[Route]:
    """The Files and Batch endpoints, serving `api`'s files and batches."""

    def upload(handler: Any, _match: re.Match[str], raw: bytes) -> None:
        fields = _multipart(handler.headers.get("content-type", ""), raw)
        if "file" not in fields or "purpose" not in fields:
            handler._json(400, _invalid("Send a multipart body with `file` and `purpose`."))
            return
        filename, data = fields["file"]
        handler._json(200, api.add_file(filename or "upload", fields["purpose"][1].decode(), data).as_json())

    def file_info(handler: Any, match: re.Match[str], _raw: bytes) -> None:
        file = api.files.get(match["id"])
        if file is None:
            handler._json(404, _invalid("No such file."))
        else:
            handler._json(200, file.as_json())

    def file_content(handler: Any, match: re.Match[str], _raw: bytes) -> None:
        file = api.files.get(match["id"])
        if file is None:
            handler._json(404, _invalid("No such file."))
            return
        handler.send_response(200)
        handler.send_header("content-type", "application/octet-stream")
        handler.send_header("content-length", str(len(file.data)))
        handler.end_headers()
        handler.wfile.write(file.data)

    def create(handler: Any, _match: re.Match[str], raw: bytes) -> None:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            handler._json(400, _invalid("The body must be a JSON object."))
            return
        batch = api.create(body)
        time.sleep(api.create_reply_delay)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up: the batch exists
            handler._json(200, api.view(batch))

    def listing(handler: Any, _match: re.Match[str], _raw: bytes) -> None:
        with api.lock:
            batches = sorted(api.batches.values(), key=lambda b: b.created_at, reverse=True)
        data = [api.view(batch) for batch in batches]
        handler._json(
            200,
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": False,
            },
        )

    def retrieve(handler: Any, match: re.Match[str], _raw: bytes) -> None:
        batch = api.batches.get(match["id"])
        if batch is None:
            handler._json(404, _invalid("No such batch."))
        else:
            handler._json(200, api.view(batch))

    return [
        ("POST", re.compile(r"/v1/files"), upload),
        ("GET", re.compile(r"/v1/files/(?P<id>[^/]+)"), file_info),
        ("GET", re.compile(r"/v1/files/(?P<id>[^/]+)/content"), file_content),
        ("POST", re.compile(r"/v1/batches"), create),
        ("GET", re.compile(r"/v1/batches"), listing),
        ("GET", re.compile(r"/v1/batches/(?P<id>[^/]+)"), retrieve),
    ]


def _parse_input(data: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The input file's request lines, or the errors OpenAI's validation would report."""
    lines: list[dict[str, Any]] = []
    seen: set[str] = set()
    models: set[str] = set()
    for number, text in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except ValueError:
            return [], [_error("invalid_json_line", "This line is not valid JSON.", number)]
        body = line.get("body") if isinstance(line, dict) else None
        if not isinstance(body, dict) or line.get("method") != "POST" or line.get("url") != endpoint:
            return [], [_error("invalid_request", f"Each line needs method POST, url {endpoint} and a body.", number)]
        if not isinstance(line.get("custom_id"), str) or line["custom_id"] in seen:
            return [], [_error("duplicate_custom_id", "custom_id must be a unique string.", number)]
        seen.add(line["custom_id"])
        models.add(str(body.get("model")))
        lines.append(line)
    if not lines:
        return [], [_error("empty_file", "The input file has no requests.")]
    if len(models) > 1:
        return [], [_error("mixed_models", "All requests in a batch must use the same model.")]
    return lines, []


def _fails(line: dict[str, Any]) -> bool:
    messages = line["body"].get("messages") or []
    last = next((m.get("content") for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), "")
    return FAIL_MARKER in str(last)


def _multipart(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """{field name: (filename, bytes)} of a multipart/form-data body."""
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    if not message.is_multipart():
        return {}
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def _jsonl(entries: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(entry) + "\n" for entry in entries).encode()


def _error(code: str, message: str, line: int | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": line}


def _invalid(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
