"""POST /v1/embeddings for token holders: the allowlisted embedding models, input-only pricing, the same guards,
budgets and ledger as every other call (the SDK's `client.embeddings.create`)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from ..callers import token_required
from ..dialects import EMBEDDINGS, Answer
from ..errors import ApiError, invalid
from ..pipeline import Call, serve
from ..router import Routed
from ..state import state
from ..strict import parse_json_body
from ..usage import estimate_tokens
from .compat import TOKENS_ONLY, openai_error_fields

bp = Blueprint("embeddings", __name__, url_prefix="/v1")
bp.after_request(openai_error_fields)


@bp.post("/embeddings")
@token_required(TOKENS_ONLY)
def embeddings() -> Response:
    """Embedding vectors for one text or a list of texts."""
    settings = state().settings
    if settings.azure_endpoint:
        raise ApiError(400, "unsupported_in_azure_mode", "Embeddings are not available in Azure OpenAI mode.")
    req = state().requests.embeddings.parse(parse_json_body(request.get_data(cache=False), request.content_type))
    allowed = settings.embedding_models
    model = req.model if req.model is not None else (allowed[0] if allowed else "")
    if model not in allowed:
        raise invalid(f"Unknown embedding model. Allowed embedding models: {', '.join(allowed) or 'none'}.")
    inputs = [req.input] if isinstance(req.input, str) else req.input
    if not 1 <= len(inputs) <= settings.embedding_max_inputs:
        raise invalid(f"'input' must be a string or a list of 1 to {settings.embedding_max_inputs} strings.")
    for index, text in enumerate(inputs):
        if not text.strip() or len(text) > settings.max_message_chars:
            where = "'input'" if isinstance(req.input, str) else f"input[{index}]"
            raise invalid(f"{where} must be a non-empty string of at most {settings.max_message_chars} characters.")
    if sum(map(len, inputs)) > settings.max_total_chars:
        raise invalid(f"The input is too long: at most {settings.max_total_chars} characters in all.")
    body = req.model_dump(exclude_none=True, exclude={"model"})
    call = Call(
        dialect=EMBEDDINGS,
        model=model,
        body=body,
        max_output=0,
        stream=False,
        prompt_estimate=sum(estimate_tokens(text) for text in inputs),
        end_user=req.user,
    )
    return serve(call, Vectors())


class Vectors:
    """The embeddings answer as the upstream sent it."""

    def reply(self, answer: Answer, routed: Routed[Answer]) -> Response:
        """The list of vectors, naming the model that made them."""
        return jsonify({**answer.body, "model": routed.model})
