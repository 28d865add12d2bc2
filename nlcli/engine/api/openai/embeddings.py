"""/v1/embeddings: answered by the app's own /encode route, called in-process, and reshaped into
OpenAI's list of embeddings (floats, or little-endian float32 in base64 when asked).
"""

from __future__ import annotations

import base64

from fastapi import Request

from nlcli.engine.api.encode import NOT_EMBEDDING_MESSAGE
from nlcli.engine.api.http_utils import json_response
from nlcli.engine.api.openai.protocol import BadRequest, EmbeddingRequest, normalize_prompt, parse_request
from nlcli.engine.api.openai.serving import OpenAIServing, error_response


class EmbeddingServing(OpenAIServing):
    def __init__(self, app, tm, args):
        super().__init__(tm, args)
        self.app = app  # the app /encode lives on

    async def serve(self, request: Request):
        import httpx

        req: EmbeddingRequest = parse_request(await request.body(), EmbeddingRequest)
        ready = getattr(self.tm, "ready", None)
        if ready is not None and ready.is_generation:
            raise BadRequest(NOT_EMBEDDING_MESSAGE)
        inp = normalize_prompt(req.input, "input")
        body = {"input_ids" if isinstance(inp[0], list) else "text": inp}
        # The native route owns embedding (pooling, normalization); answering through it keeps
        # /v1/embeddings equal to /encode by construction.
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://nl", timeout=None) as c:
            r = await c.post("/encode", json=body)
        if r.status_code in (404, 405):
            return error_response("This server has no /encode route, so it cannot serve embeddings.",
                                  501, "NotImplementedError")
        out = r.json()
        if r.status_code != 200:
            msg = out.get("error", {}).get("message") if isinstance(out, dict) else None
            return error_response(msg or r.text, r.status_code)
        outs = out if isinstance(out, list) else [out]
        data = []
        for i, o in enumerate(outs):
            emb = o["embedding"]
            if req.encoding_format == "base64":
                import numpy as np

                emb = base64.b64encode(np.asarray(emb, dtype="<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        p = sum(o["meta_info"]["prompt_tokens"] for o in outs)
        return json_response({"object": "list", "data": data, "model": self.model_name,
                              "usage": {"prompt_tokens": p, "total_tokens": p, "completion_tokens": 0,
                                        "prompt_tokens_details": None}})
