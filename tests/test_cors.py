"""A browser frontend on an allowed origin, in real Chromium: its preflights pass for what the README invites
(X-Request-ID) and fail for methods no route takes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from chatproxy import create_app

pytestmark = pytest.mark.browser

FETCH = """async ([url, init]) => {
  try {
    const response = await fetch(url, init);
    return {status: response.status, body: await response.text()};
  } catch (error) {
    return {failed: String(error)};
  }
}"""


@pytest.fixture
def frontend() -> Iterator[str]:
    """Another origin (localhost, not 127.0.0.1) serving an empty page, as a frontend's own server would."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>frontend</title>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_frontend_may_send_x_request_id_but_no_method_the_routes_lack(browser, frontend, settings_for, serve, fake):
    api = serve(create_app(settings_for(CHATPROXY_ALLOW_ANONYMOUS=False, CHATPROXY_ALLOWED_ORIGINS=frontend)))
    page = browser.new_page()
    page.goto(frontend + "/")
    headers = {"Content-Type": "application/json", "X-Request-ID": "frontend-0001"}

    chat = page.evaluate(
        FETCH, [api + "/api/chat", {"method": "POST", "headers": headers, "body": '{"message": "hi"}'}]
    )
    delete = page.evaluate(FETCH, [api + "/api/chat", {"method": "DELETE", "headers": headers}])
    page.close()

    assert chat.get("status") == 200, chat
    assert '"content":"Echo: hi"' in chat["body"]
    assert "failed" in delete, delete  # the browser refuses it after the preflight: no route takes DELETE
    assert len(fake.chat_calls()) == 1
