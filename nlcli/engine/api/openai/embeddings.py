"""/v1/embeddings: the native encode path (EmbeddingManager, which owns tokenization, pooling and
normalization), called directly, so /v1/embeddings equals /encode by construction; reshaped into
OpenAI's list of embeddings (floats, or little-endian float32 in base64 when asked). `dimensions`
(Matryoshka models only, decided from the model's config as SGLang does) keeps the first values
of each vector and normalises them again.
"""

from __future__ import annotations

import base64

from fastapi import Request
from fastapi.responses import Response

from nlcli.engine.api.encode import (NOT_EMBEDDING_MESSAGE, EmbeddingManager, EncodeRejected,
                                     embed_items)
from nlcli.engine.api.http_utils import json_response
from nlcli.engine.api.openai.protocol import BadRequest, EmbeddingRequest, normalize_prompt
from nlcli.engine.api.openai.serving import OpenAIServing, error_response
from nlcli.engine.configs.embedding_config import check_matryoshka_dimensions, truncate_embedding


class EmbeddingServing(OpenAIServing):
    needs_tokenizer = False  # token-id inputs need none; text is refused by the encode path

    def __init__(self, embeddings: EmbeddingManager, tm, args):
        super().__init__(tm, args)
        self.embeddings = embeddings
        self._hf_config = None

    def hf_config(self):
        """The served model's config, overrides applied (read once, when `dimensions` is asked)."""
        if self._hf_config is None:
            from nlcli.engine.configs.config_overrides import parse_model_overrides
            from nlcli.engine.configs.model_source import resolve_model_source

            a = self.args
            self._hf_config = resolve_model_source(
                a.model_path, True, a.revision, a.download_dir,
                parse_model_overrides(a.json_model_override_args)).hf_config()
        return self._hf_config

    async def serve(self, request: Request):
        req: EmbeddingRequest = await self.parse(request, EmbeddingRequest)
        if not self.embeddings.serves_embeddings:
            raise BadRequest(NOT_EMBEDDING_MESSAGE)
        if req.dimensions is not None:
            try:
                check_matryoshka_dimensions(self.hf_config(), self.args.model_path, req.dimensions)
            except ValueError as e:
                raise BadRequest(str(e), "dimensions") from e
        items = embed_items(normalize_prompt(req.input, "input"))
        try:
            outs = await self.embeddings.encode(items, request)
        except EncodeRejected as e:
            return error_response(e.message, e.status)
        if outs is None:
            return Response(status_code=499)
        data = []
        for i, o in enumerate(outs):
            emb = o["embedding"]
            if req.dimensions is not None:
                emb = truncate_embedding(emb, req.dimensions,
                                         self.embeddings.embedding_config().normalize)
            if req.encoding_format == "base64":
                import numpy as np

                emb = base64.b64encode(np.asarray(emb, dtype="<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        p = sum(o["meta_info"]["prompt_tokens"] for o in outs)
        return json_response({"object": "list", "data": data, "model": self.model_name,
                              "usage": {"prompt_tokens": p, "total_tokens": p, "completion_tokens": 0,
                                        "prompt_tokens_details": None}})
