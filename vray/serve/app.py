"""The Ray Serve application: an OpenAI-compatible FastAPI ingress in front of a model-server deployment.

`app_builder(args)` is a Ray Serve application builder, so the same app runs from `vray serve`, from a
Serve config file (`import_path: vray.serve.app:app_builder`) and from a KubeRay RayService.
"""
# No `from __future__ import annotations` here: FastAPI reads the route signatures' types at runtime.

import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from vray.errors import RequestError, VrayError
from vray.serve.target import ServeTarget

api = FastAPI(title="vray", description="OpenAI-compatible endpoint of a vray fine-tune")


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": status}})


@serve.deployment(name="ModelServer", max_ongoing_requests=8, ray_actor_options={"num_cpus": 1})
class ModelServer:
    """Holds the model; answers chat and grounding requests. Bad requests come back as errors, never crashes."""

    def __init__(self, target: dict[str, Any], allowed_image_hosts: list[str] | None = None):
        from vray.serve.engine import ModelEngine

        self.engine = ModelEngine(ServeTarget(**target), allowed_image_hosts=tuple(allowed_image_hosts or ()))

    def _safely(self, fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            result = fn(*args, **kwargs)
        except (RequestError, VrayError) as exc:
            return {"error": str(exc), "status": 400}
        except Exception as exc:  # noqa: BLE001 - one failed request must not take the replica down
            return {"error": f"generation failed: {type(exc).__name__}: {exc}", "status": 500}
        return {"text": result.text, "boxes": result.boxes, "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens, "finish_reason": result.finish_reason}

    def chat(self, payload: dict[str, Any]) -> dict[str, Any]:
        """One chat completion from an OpenAI-format payload."""
        params = {k: payload.get(k) for k in ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                                              "repetition_penalty")}
        return self._safely(self.engine.chat, payload.get("messages"),
                            chat_template_kwargs=payload.get("chat_template_kwargs"), **params)

    def ground(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Boxes for `{image, phrase}`."""
        image, phrase = payload.get("image"), payload.get("phrase")
        if not isinstance(image, str) or not isinstance(phrase, str) or not phrase.strip():
            return {"error": "ground: 'image' (a data: URL or base64) and a non-empty 'phrase' are required", "status": 400}
        return self._safely(self.engine.ground, image, phrase.strip())


@serve.deployment(name="Ingress", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    """HTTP: POST /v1/chat/completions, POST /v1/ground, GET /v1/models, GET /healthz."""

    def __init__(self, server: DeploymentHandle, model_id: str, api_key: str | None = None):
        self.server = server
        self.model_id = model_id
        self.api_key = api_key
        self.created = int(time.time())

    def _unauthorized(self, request: Request) -> JSONResponse | None:
        if not self.api_key:
            return None
        if request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error")
        return None

    async def _payload(self, request: Request) -> dict[str, Any] | JSONResponse:
        """The JSON body of an authorised request for this model, or the error response."""
        if (denied := self._unauthorized(request)) is not None:
            return denied
        try:
            payload = await request.json()
        except Exception:  # noqa: BLE001
            return _error(400, "the request body is not valid JSON")
        if not isinstance(payload, dict):
            return _error(400, "the request body must be a JSON object")
        model = payload.get("model")
        if model not in (None, "", self.model_id):
            return _error(404, f"model {model!r} is not served here; available: {self.model_id}", "not_found_error", "model")
        return payload

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model": self.model_id}

    @api.get("/v1/models")
    async def models(self, request: Request) -> Any:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": self.created, "owned_by": "vray"}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        payload = await self._payload(request)
        if isinstance(payload, JSONResponse):
            return payload
        if payload.get("stream"):
            return _error(400, "stream: streaming responses are not available in this version; send stream: false", param="stream")
        if payload.get("n", 1) != 1:
            return _error(400, "n: only one choice per request is supported", param="n")
        out = await self.server.chat.remote(payload)
        if "error" in out:
            return _error(out["status"], out["error"], "server_error" if out["status"] >= 500 else "invalid_request_error")
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": out["text"]},
                                  "finish_reason": out["finish_reason"]}
        if out["boxes"]:
            choice["boxes"] = out["boxes"]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [choice],
            "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                      "total_tokens": out["prompt_tokens"] + out["completion_tokens"]},
        }

    @api.post("/v1/ground")
    async def ground(self, request: Request) -> Any:
        payload = await self._payload(request)
        if isinstance(payload, JSONResponse):
            return payload
        out = await self.server.ground.remote(payload)
        if "error" in out:
            return _error(out["status"], out["error"])
        return {"boxes": out["boxes"], "text": out["text"]}


def build_app(target: ServeTarget, api_key: str | None = None, allowed_image_hosts: list[str] | None = None,
              replica_cpus: float = 1) -> Any:
    """The Serve application for one target."""
    server = ModelServer.options(ray_actor_options={"num_cpus": replica_cpus}).bind(target.to_dict(), allowed_image_hosts)
    return Ingress.bind(server, target.model_id, api_key)


def app_builder(args: dict[str, Any]) -> Any:
    """Ray Serve application builder: `args: {target: RUN_DIR|CHECKPOINT|SOURCE, api_key?, allowed_image_hosts?}`."""
    from vray.serve.target import resolve_target

    target = resolve_target(str(args["target"]), architecture=args.get("architecture"), task=args.get("task"))
    return build_app(target, api_key=args.get("api_key"), allowed_image_hosts=args.get("allowed_image_hosts"))
