"""Bench path F: the plainest Flask + OpenAI SDK proxy, as a seed's Express proxy translates literally.

No limits, no ledger, no budget, no validation: one SDK call per request, each streamed chunk re-serialized
by the SDK. It is what "a plain Flask proxy" costs, measured with the same gunicorn, core and load as chatproxy.

    OPENAI_BASE_URL=... OPENAI_API_KEY=... gunicorn -k gthread -w 2 --threads 512 plain_proxy:app   (from bench/)
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Flask, Response, jsonify, request
from openai import OpenAI

app = Flask(__name__)
client = OpenAI()  # OPENAI_API_KEY and OPENAI_BASE_URL from the environment


@app.post("/v1/chat/completions")
def chat() -> Response:
    """Forward the body as it is; stream the chunks back as SSE, or the whole completion as JSON."""
    body = request.get_json()
    if not body.get("stream"):
        return jsonify(client.chat.completions.create(**body).model_dump())

    def events() -> Iterator[str]:
        for chunk in client.chat.completions.create(**body):
            yield f"data: {chunk.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"

    return Response(events(), mimetype="text/event-stream")
