"""An in-process endpoint with scripted log-probabilities, to check evaluation arithmetic end to end.

Token ``t`` gets log-probability ``logprob(t)``; it is the most likely token when ``t`` is even. The
served model name picks a failure: ``nologprobs`` answers without prompt log-probabilities,
``shifted`` scores every token 0.5 lower than ``scorer``. Chat always answers ``#### 18``.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

MODELS = ("scorer", "shifted", "nologprobs")


def logprob(token: int) -> float:
    return -0.1 * (token % 10) - 0.05


def _top(token: int, lp: float) -> dict[str, float]:
    rival = lp - 1.0 if token % 2 == 0 else lp + 0.01
    return {f"token_id:{token}": lp, "token_id:99999": rival}


def make_fake_scorer() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model"} for m in MODELS]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        ids, model = body["prompt"], body["model"]
        if body.get("logprobs", 0) > 20:
            return JSONResponse({"error": {"message": "Requested sample logprobs of 50, which is greater than max "
                                                      "allowed: 20", "type": "BadRequestError", "param": "logprobs",
                                           "code": 400}}, status_code=400)
        if model == "nologprobs":
            return {"choices": [{"index": 0, "text": "", "logprobs": None}]}
        shift = -0.5 if model == "shifted" else 0.0
        lps = [logprob(t) + shift for t in ids]
        return {"choices": [{"index": 0, "text": "", "logprobs": {
            "tokens": [f"token_id:{t}" for t in ids], "token_logprobs": [None, *lps[1:]],
            "top_logprobs": [None, *(_top(t, lp) for t, lp in zip(ids[1:], lps[1:]))]}}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "So 9 * 2 = 18.\n#### 18"}}]}

    return app
