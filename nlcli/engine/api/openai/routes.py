"""The OpenAI-compatible /v1 API's entry point: the route table (`register_openai_routes`, which
http_server.py calls) and /v1/models, the one served model's card.

Each route's work lives in its own module: completions.py, chat.py, embeddings.py, score.py and
responses.py (/v1/responses), on the shared plumbing of serving.py, and ../tokenize.py (/tokenize,
/detokenize); the wire shapes (request models, logprob formats, the error envelope) are
protocol.py's.
"""

from __future__ import annotations

import time

from nlcli.engine.api.encode import EmbeddingManager
from nlcli.engine.api.http_utils import json_response
from nlcli.engine.api.openai.chat import ChatServing
from nlcli.engine.api.openai.completions import CompletionServing
from nlcli.engine.api.openai.embeddings import EmbeddingServing
from nlcli.engine.api.openai.responses import register_responses_routes
from nlcli.engine.api.openai.score import ScoreServing
from nlcli.engine.api.openai.serving import error_response
from nlcli.engine.api.tokenize import register_tokenize_routes


def register_openai_routes(app, tm, args, embeddings: EmbeddingManager) -> None:
    """Add the /v1 routes to the FastAPI `app` (the one /generate lives on); /v1/embeddings
    answers through `embeddings`, the manager behind /encode."""
    # All built before any route is added: a bad --chat-template fails here, leaving no /v1 routes.
    models = ModelCards(tm, args)
    completions, chat = CompletionServing(tm, args), ChatServing(tm, args)
    embedding, score = EmbeddingServing(embeddings, tm, args), ScoreServing(tm, args)
    app.add_api_route("/v1/models", models.list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", models.get_model, methods=["GET"])
    app.add_api_route("/v1/completions", completions.handle, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat.handle, methods=["POST"])
    app.add_api_route("/v1/embeddings", embedding.handle, methods=["POST"])
    register_tokenize_routes(app, tm, args, chat.chat)  # /tokenize, /detokenize (and /v1/...)
    register_responses_routes(app, tm, args, chat.chat)  # /v1/responses, GET /v1/responses/{id}
    app.add_api_route("/v1/score", score.handle, methods=["POST"])


class ModelCards:
    """/v1/models: the served model, named --served-model-name or else its path."""

    def __init__(self, tm, args):
        self.tm = tm
        self.model_name = args.served_model_name or args.model_path
        self.created = int(time.time())

    def _card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "nl", "root": self.model_name, "max_model_len": self.tm.context_len}

    async def list_models(self):
        return json_response({"object": "list", "data": [self._card()]})

    async def get_model(self, model_id: str):
        if model_id != self.model_name:
            return error_response(f"The model {model_id!r} does not exist.", 404, "NotFoundError",
                                  "model")
        return json_response(self._card())
