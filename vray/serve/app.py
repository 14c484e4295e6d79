"""The Ray Serve application: an OpenAI-compatible FastAPI ingress in front of a model-server deployment.

`app_builder(args)` is a Ray Serve application builder, so the same app runs from `vray serve`, from a Serve
config file (`import_path: vray.serve.app:app_builder`, what `serve run`, `serve deploy` and a KubeRay
RayService's `serveConfigV2` take) and from `vray serve --config`.

The model server batches concurrent generations with `@serve.batch`, serves extra LoRA adapters of its base
by name (`model: "<base>:<adapter>"`, loaded on demand through Serve's model multiplexing, which keeps at most
`serving.maxAdapters` per replica and drops the least recently used, never while a request uses it), streams
with `stream: true` beside the batches (stopping when the client leaves), and reports request, token and latency
metrics through Ray's Prometheus metrics.
"""
# No `from __future__ import annotations` here: FastAPI reads the route signatures' types at runtime.

import asyncio
import hmac
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from vray.infer.engine import ChatResult, RequestFailure, grounding_messages
from vray.infer.target import ServeTarget
from vray.serve.config import AppArgs
from vray.serve.options import ServeOptions

api = FastAPI(title="vray", description="OpenAI-compatible endpoint of a vray fine-tune")

GENERATION_KEYS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "repetition_penalty")
LATENCY_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]
UNKNOWN_MODEL = "unknown"  # the metric label of a model name that is neither served nor a known adapter


# Helpers sit above the deployments: Serve serializes the deployment classes when they are decorated.
def _error(status: int, message: str, kind: str | None = None, param: str | None = None) -> JSONResponse:
    kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": status}})


def _failed(failure: RequestFailure) -> JSONResponse:
    return _error(failure.status, failure.message)


def _usage(result: ChatResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


async def _on_a_live_replica(attempt: Callable[[], Awaitable[Any]]) -> Any:
    """`await attempt()`, once more when the replica it reached died (Serve routes the second try elsewhere)."""
    from ray.exceptions import RayActorError  # ActorDiedError and ActorUnavailableError are RayActorErrors

    for tries in (1, 2):
        try:
            return await attempt()
        except RayActorError as exc:
            if tries == 2:
                return RequestFailure(f"the model replica failed twice ({type(exc).__name__}); retry later", 503)
    raise AssertionError("unreachable")


class _AdapterSlot:
    """An adapter loaded into the shared base; Serve's multiplexing calls `__del__` when it evicts it."""

    def __init__(self, engine: Any, name: str):
        self.engine, self.name, self.live = engine, name, True

    def __del__(self) -> None:
        if getattr(self, "live", False):
            self.live = False
            self.engine.unload_adapter(self.name)


@serve.deployment(name="ModelServer", max_ongoing_requests=16, ray_actor_options={"num_cpus": 1})
class ModelServer:
    """Holds the model; answers chat and grounding requests. Bad requests come back as RequestFailures, never crashes."""

    def __init__(self, target: ServeTarget, options: ServeOptions):
        from ray.serve import metrics

        from vray.infer.engine import ModelEngine
        from vray.infer.target import local_on_this_node
        from vray.serve.adapters import AdapterCatalog

        self.target = local_on_this_node(target)  # a replica may run on another node than the builder
        self.options = options
        gpus = self.options.replica.num_gpus
        self.engine = ModelEngine(self.target, allowed_image_hosts=self.options.allowed_image_hosts,
                                  limits=self.options.limits, device_map="auto" if gpus > 1 else None)
        self.catalog = AdapterCatalog(self.target.base_source, self.options.adapters, self.options.adapters_dir,
                                      full_weights=self.target.weights is not None)
        serving = self.options.serving
        self._batched.set_max_batch_size(serving.maxBatchSize)
        self._batched.set_batch_wait_timeout_s(serving.batchWaitTimeoutS)
        self._streams = asyncio.Semaphore(serving.maxBatchSize)  # streams generating at once, beside the batches

        async def load(model_id: str) -> _AdapterSlot:
            folder = await asyncio.to_thread(self.catalog.resolve, model_id)
            await asyncio.to_thread(self.engine.load_adapter, model_id, folder)
            return _AdapterSlot(self.engine, model_id)

        self._adapter = serve.multiplexed(max_num_models_per_replica=serving.maxAdapters)(load)
        tags = ("model",)
        self.m_requests = metrics.Counter("vray_requests", description="Generation requests by outcome.",
                                          tag_keys=("model", "outcome"))
        self.m_prompt = metrics.Counter("vray_prompt_tokens", description="Prompt tokens processed.", tag_keys=tags)
        self.m_completion = metrics.Counter("vray_completion_tokens", description="Tokens generated.", tag_keys=tags)
        self.m_latency = metrics.Histogram("vray_generation_seconds", description="Time from request to last token.",
                                           boundaries=LATENCY_BOUNDARIES, tag_keys=tags)
        self.m_batch = metrics.Histogram("vray_batch_size", description="Requests generated together.",
                                         boundaries=[1, 2, 4, 8, 16, 32, 64])

    # ---- helpers ---------------------------------------------------------------------------------
    async def _hold_adapter(self) -> str | None:
        """The request's extra adapter, loaded and held for it (None: the deployment's own model). The hold comes
        right after the load, with no await between them, so the LRU cannot drop the adapter before it is used;
        the caller releases it when the request ends (`_release`)."""
        adapter = serve.get_multiplexed_model_id() or None
        if adapter:
            await self._adapter(adapter)
            self.engine.hold(adapter)
        return adapter

    async def _release(self, adapter: str | None) -> None:
        if adapter:
            await asyncio.to_thread(self.engine.unload_adapter, adapter)

    async def _prepare(self, payload: dict[str, Any], adapter: str | None, want_boxes: bool | None = None) -> Any:
        params = {k: payload.get(k) for k in GENERATION_KEYS}
        return await asyncio.to_thread(self.engine.prepare, payload.get("messages"), payload.get("chat_template_kwargs"),
                                       want_boxes, adapter, **params)

    def _label(self, model: str, outcome: str) -> str:
        """The metric label of `model`: clients may invent adapter names, and each label is a new time series, so
        only the deployment's own model and adapters it has loaded or names keep theirs."""
        adapter = model[len(self.target.base_id) + 1:] if model.startswith(self.target.base_id + ":") else None
        if model == self.target.model_id or outcome == "ok" or (
                adapter is not None and (adapter in self.engine.adapters or adapter in self.catalog.named)):
            return model
        return UNKNOWN_MODEL

    def _count(self, model: str, outcome: str, result: Any = None, started: float | None = None) -> None:
        model = self._label(model, outcome)
        self.m_requests.inc(tags={"model": model, "outcome": outcome})
        if result is not None:
            self.m_prompt.inc(result.prompt_tokens, tags={"model": model})
            self.m_completion.inc(result.completion_tokens, tags={"model": model})
        if started is not None:
            self.m_latency.observe(time.perf_counter() - started, tags={"model": model})

    def _failed(self, model: str, failure: RequestFailure) -> RequestFailure:
        self._count(model, "rejected" if failure.status < 500 else "failed")
        return failure

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batched(self, prepared: list[Any]) -> list[Any]:
        self.m_batch.observe(len(prepared))
        return await asyncio.to_thread(self.engine.generate, prepared)

    async def _generate(self, prepared: Any) -> ChatResult | RequestFailure:
        if self.options.serving.maxBatchSize > 1:
            return await self._batched(prepared)
        return (await asyncio.to_thread(self.engine.generate, [prepared]))[0]

    # ---- methods the ingress calls ---------------------------------------------------------------
    async def chat(self, payload: dict[str, Any], model: str, want_boxes: bool | None = None) -> ChatResult | RequestFailure:
        """One chat completion from an OpenAI-format payload."""
        started = time.perf_counter()
        adapter = None
        try:
            adapter = await self._hold_adapter()
            result = await self._generate(await self._prepare(payload, adapter, want_boxes))
        except Exception as exc:  # noqa: BLE001 - one failed request must not take the replica down
            return self._failed(model, RequestFailure.of(exc))
        finally:
            await self._release(adapter)
        if isinstance(result, RequestFailure):  # its batch failed (the others in the replica's batch did not)
            return self._failed(model, result)
        self._count(model, "ok", result, started)
        return result

    async def chat_stream(self, payload: dict[str, Any], model: str) -> AsyncIterator[str | ChatResult | RequestFailure]:
        """Text pieces then the ChatResult; a RequestFailure first when the request is bad, or last when generation fails.

        Streams do not join the batcher: each generates on its own, at most `serving.maxBatchSize` at once per
        replica, taking turns with the batches a token at a time. When the caller goes away (the client
        disconnected), the generation stops at its next token."""
        started = time.perf_counter()
        adapter, stop = None, threading.Event()
        try:
            adapter = await self._hold_adapter()
            prepared = await self._prepare(payload, adapter)
        except Exception as exc:  # noqa: BLE001
            await self._release(adapter)
            yield self._failed(model, RequestFailure.of(exc))
            return
        try:
            async with self._streams:
                pieces = self.engine.stream(prepared, stop)
                end = object()
                while True:
                    try:
                        item = await asyncio.to_thread(next, pieces, end)
                    except Exception as exc:  # noqa: BLE001
                        yield self._failed(model, RequestFailure.of(exc))
                        return
                    if item is end:
                        return
                    if isinstance(item, ChatResult):
                        self._count(model, "ok", item, started)
                    yield item
        finally:  # also on cancellation: the caller is gone, so is the generation
            stop.set()
            await self._release(adapter)

    async def ground(self, payload: dict[str, Any], model: str) -> ChatResult | RequestFailure:
        """Boxes for `{image, phrase}`."""
        image, phrase = payload.get("image"), payload.get("phrase")
        if not isinstance(image, str) or not isinstance(phrase, str) or not phrase.strip():
            return RequestFailure("ground: 'image' (a data: URL or base64) and a non-empty 'phrase' are required", 400)
        return await self.chat({**payload, "messages": grounding_messages(image, phrase.strip())}, model, want_boxes=True)

    def generation_stats(self) -> dict[str, Any]:
        """This replica's process id, the tokens it has generated (cancelled requests included) and its adapters."""
        return {"pid": os.getpid(), "generated_tokens": self.engine.generated_tokens,
                "adapters": sorted(self.engine.adapters)}

    def adapters(self) -> list[str]:
        """Adapter names this deployment can load."""
        return self.catalog.names()

    def loaded_adapters(self) -> list[str]:
        """Adapters loaded on this replica now."""
        return sorted(self.engine.adapters)

    def pid(self) -> int:
        """This replica's process id (operators and the failure test use it)."""
        return os.getpid()


@serve.deployment(name="Ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    """HTTP: POST /v1/chat/completions, POST /v1/ground, GET /v1/models, GET /healthz."""

    def __init__(self, server: DeploymentHandle, target: ServeTarget, options: ServeOptions):
        self.server = server
        self.target = target
        self.options = options
        self.model_id = self.target.model_id
        self.base_id = self.target.base_id
        self.api_key = self.options.api_key
        self.created = int(time.time())

    # ---- request checks --------------------------------------------------------------------------
    def _unauthorized(self, request: Request) -> JSONResponse | None:
        if not self.api_key:
            return None
        sent = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(sent, f"Bearer {self.api_key}".encode()):  # constant time: no guessing by timing
            return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error")
        return None

    def _route(self, model: Any) -> str | None | JSONResponse:
        """None for the deployment's own model, an adapter name for `<base>:<adapter>`, or a 404."""
        if model in (None, "", self.model_id):
            return None
        if isinstance(model, str) and model.startswith(self.base_id + ":") and len(model) > len(self.base_id) + 1:
            return model[len(self.base_id) + 1:]
        return _error(404, f"model {model!r} is not served here; use {self.model_id!r}, or '{self.base_id}:<adapter>' "
                           "for an adapter of the same base (GET /v1/models lists them)", "not_found_error", "model")

    async def _accept(self, request: Request) -> tuple[dict[str, Any], str | None] | JSONResponse:
        """The request's JSON body and the adapter its `model` names, or the error response that refuses it."""
        payload = await self._payload(request)
        if isinstance(payload, JSONResponse):
            return payload
        adapter = self._route(payload.get("model"))
        if isinstance(adapter, JSONResponse):
            return adapter
        return payload, adapter

    async def _payload(self, request: Request) -> dict[str, Any] | JSONResponse:
        """The JSON body of an authorised request of acceptable size, or the error response."""
        if (denied := self._unauthorized(request)) is not None:
            return denied
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return _error(413, f"the request body is {int(declared):,} bytes, over the limit of {limit:,}")
        body = bytearray()
        async for piece in request.stream():  # a chunked body has no length: stop reading once it is over
            body += piece
            if len(body) > limit:
                return _error(413, f"the request body is over the limit of {limit:,} bytes (serving.maxBodyMB); send "
                                   "smaller or fewer images")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the request body is not valid JSON")
        if not isinstance(payload, dict):
            return _error(400, "the request body must be a JSON object")
        return payload

    async def _call(self, method: str, payload: dict[str, Any], adapter: str | None) -> ChatResult | RequestFailure:
        """Call the model server; a replica that dies mid-request is retried once on another."""
        handle = self.server.options(multiplexed_model_id=adapter or "")
        return await _on_a_live_replica(lambda: getattr(handle, method).remote(payload, self._served(adapter)))

    def _served(self, adapter: str | None) -> str:
        return f"{self.base_id}:{adapter}" if adapter else self.model_id

    # ---- routes ----------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model": self.model_id}

    @api.get("/v1/models")
    async def models(self, request: Request) -> Any:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        ids = [self.model_id]
        try:
            ids += [f"{self.base_id}:{name}" for name in await self.server.adapters.remote()]
        except Exception:  # noqa: BLE001 - listing adapters is best effort (an unreachable prefix)
            pass
        return {"object": "list", "data": [{"id": i, "object": "model", "created": self.created, "owned_by": "vray",
                                            "root": self.base_id} for i in ids]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        accepted = await self._accept(request)
        if isinstance(accepted, JSONResponse):
            return accepted
        payload, adapter = accepted
        if payload.get("n", 1) != 1:
            return _error(400, "n: only one choice per request is supported", param="n")
        model = payload.get("model") or self.model_id
        if payload.get("stream"):
            return await self._stream(payload, adapter, model)
        out = await self._call("chat", payload, adapter)
        if isinstance(out, RequestFailure):
            return _failed(out)
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": out.text},
                                  "finish_reason": out.finish_reason}
        if out.boxes or self.target.task == "phrase_grounding":
            choice["boxes"] = out.boxes
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": model, "choices": [choice], "usage": _usage(out)}

    async def _stream(self, payload: dict[str, Any], adapter: str | None, model: str) -> Any:
        handle = self.server.options(multiplexed_model_id=adapter or "", stream=True)

        async def start() -> tuple[Any, Any]:
            events = handle.chat_stream.remote(payload, self._served(adapter))
            try:
                return events, await events.__anext__()
            except BaseException:  # the replica died (retried), or the client left while we waited
                events.cancel()
                raise

        opened = await _on_a_live_replica(start)  # a stream that fails before its first item is retried too
        if isinstance(opened, RequestFailure):
            return _failed(opened)
        events, first = opened
        if isinstance(first, RequestFailure):
            return _failed(first)
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **extra}]}
            return f"data: {json.dumps(body)}\n\n"

        def failure(message: str, status: int) -> str:  # after the stream started: in-band, as OpenAI does
            return f"data: {json.dumps({'error': {'message': message, 'code': status}})}\n\n"

        async def sse() -> AsyncIterator[str]:
            from ray.exceptions import RayActorError

            done = False
            try:
                yield chunk({"role": "assistant", "content": ""})
                item = first
                while True:
                    if isinstance(item, str):
                        yield chunk({"content": item})
                    elif isinstance(item, ChatResult):
                        extra = {"boxes": item.boxes} if item.boxes else {}
                        yield chunk({}, item.finish_reason, **extra)
                        if include_usage:
                            yield f"data: {json.dumps({'id': ident, 'object': 'chat.completion.chunk', 'created': created, 'model': model, 'choices': [], 'usage': _usage(item)})}\n\n"
                    else:
                        yield failure(item.message, item.status)
                        break
                    try:
                        item = await events.__anext__()
                    except StopAsyncIteration:
                        break
                    except RayActorError as exc:
                        yield failure(f"the model replica failed during the stream ({type(exc).__name__}); retry", 503)
                        break
                done = True
                yield "data: [DONE]\n\n"
            finally:  # the client went away: stop the generation on the replica
                if not done:
                    events.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream")

    @api.post("/v1/ground")
    async def ground(self, request: Request) -> Any:
        accepted = await self._accept(request)
        if isinstance(accepted, JSONResponse):
            return accepted
        payload, adapter = accepted
        out = await self._call("ground", payload, adapter)
        if isinstance(out, RequestFailure):
            return _failed(out)
        return {"boxes": out.boxes, "text": out.text}


def build_app(target: ServeTarget, options: ServeOptions) -> Any:
    """The Serve application for one resolved target (Serve pickles the bound objects into each replica)."""
    server = ModelServer.options(**options.deployment_options()).bind(target, options)
    return Ingress.bind(server, target, options)


def app_builder(args: dict[str, Any]) -> Any:
    """Ray Serve application builder. `args` are a Serve config's (vray.serve.config.AppArgs): `target` (run
    directory, checkpoint, model folder or source), and optionally `architecture`, `task`, `api_key_env` (the
    variable holding the key; default VRAY_API_KEY), `allowed_image_hosts`, `adapters {name: run}`, `adapters_dir`,
    `serving {<serving block keys>}`, `insecure` (serve without a key). The target is resolved here, once.

    A config is deployed by whoever holds it (`serve deploy`, a RayService), so the app refuses to start without
    its key unless the config says `insecure: true`."""
    from vray.errors import VrayError
    from vray.infer.target import resolve_target

    app = AppArgs.from_config(args)
    api_key = os.environ.get(app.api_key_env) or None
    if api_key is None and not app.insecure:
        raise VrayError(f"the vray app has no API key: set {app.api_key_env} in the environment it starts in (clients "
                        "then send 'Authorization: Bearer <key>'), or set `insecure: true` in its args to serve "
                        "without one")
    target = resolve_target(app.target, architecture=app.architecture, task=app.task)
    return build_app(target, app.options(target, api_key=api_key))
