"""The Serve application on 127.0.0.1: the OpenAI API (official client, streaming), adapters of one base picked by
`model`, a stream beside batches and its client going away, bad input and keys, abusive requests under load,
Prometheus metrics, a replica killed under load (plain and streaming requests), and deploying a written config file.

One deployment (two replicas, batching, an adapter folder with an LRU bound of one adapter per replica) serves the
whole module; the config-file test runs last because a config is the cluster's whole desired Serve state."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.conftest import run_cli
from vray.cluster import free_port
from vray.testing.abuse import abusive_requests, png_claiming
from vray.testing.runs import write_adapter_run

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _png(colour=(200, 30, 30), size=(112, 112), fmt="PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _messages(text="What colour is the square?", image=None):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image or _png()}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-runs")
    main = write_adapter_run(root, "main-run", seed=1, task="phrase_grounding")
    adapters = root / "adapters"
    for i, name in enumerate(("alpha", "beta", "delta")):  # delta: only the stream test asks for it
        write_adapter_run(adapters, name, seed=10 + i)
    return {"main": main, "adapters": adapters, "root": root}


@pytest.fixture(scope="module")
def served(ray_head, runs):
    from vray.infer.target import resolve_target
    from vray.serve.options import ServeOptions
    from vray.serve.runner import deploy, shutdown

    target = resolve_target(runs["main"].uri)
    options = ServeOptions.resolve(
        target, {"minReplicas": 2, "maxReplicas": 2, "maxBatchSize": 8, "maxAdapters": 1, "maxImages": 2,
                 "maxImagePixels": 512 * 512, "maxBodyMB": 2},
        api_key=KEY, adapters_dir=str(runs["adapters"]),
    )
    port = free_port()
    endpoint = deploy(target, options, port=port)
    yield endpoint, target
    shutdown()


def _post(url, body, headers=AUTH, path="/v1/chat/completions", timeout=120):
    return httpx.post(url + path, json=body, headers=headers, timeout=timeout)


def test_openai_client_chat_models_and_streaming(served):
    import openai

    endpoint, target = served
    client = openai.OpenAI(base_url=endpoint.url + "/v1", api_key=KEY)
    models = [m.id for m in client.models.list().data]
    assert models[0] == "main-run"
    assert {"tiny:qwen2_5_vl:alpha", "tiny:qwen2_5_vl:beta"} <= set(models)
    reply = client.chat.completions.create(model="main-run", messages=_messages(), max_tokens=6)
    text = reply.choices[0].message.content
    assert text and reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 20
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model_extra is not None
    # a grounding run's choices carry boxes (possibly empty for a random adapter), in a list
    assert isinstance(reply.choices[0].model_extra.get("boxes"), list)
    # stream: true gives the same greedy text, piece by piece, then usage
    stream = client.chat.completions.create(model="main-run", messages=_messages(), max_tokens=6, stream=True,
                                            stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces).strip() == text
    assert finish in ("stop", "length") and usage.completion_tokens == reply.usage.completion_tokens


def test_each_adapter_answers_as_it_does_locally_with_one_loaded_per_replica(served, runs):
    from ray import serve

    from vray.infer.engine import ModelEngine
    from vray.infer.target import resolve_target

    endpoint, _ = served
    answers = {}
    for name in ("alpha", "beta", "alpha"):
        r = _post(endpoint.url, {"model": f"tiny:qwen2_5_vl:{name}", "messages": _messages(), "max_tokens": 8})
        assert r.status_code == 200, r.text
        answers.setdefault(name, set()).add(r.json()["choices"][0]["message"]["content"])
    assert all(len(v) == 1 for v in answers.values())  # the same adapter answers the same (greedy) every time
    for name in ("alpha", "beta"):
        local = ModelEngine(resolve_target(str(runs["adapters"] / name)), device="cpu")
        expected = local.chat(_messages(), max_tokens=8).text
        assert answers[name] == {expected}, name
    assert answers["alpha"] != answers["beta"]
    handle = serve.get_deployment_handle("ModelServer", app_name="vray")
    loaded = [handle.loaded_adapters.remote().result() for _ in range(6)]
    assert all(len(names) <= 1 for names in loaded), loaded  # the LRU bound of one adapter per replica


def _raw_stream(url: str, body: dict) -> socket.socket:
    """A streaming request on a socket of its own, which the test closes to act as a client that goes away."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    data = json.dumps({**body, "stream": True}).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _stats(adapter: str = "") -> dict:
    """A replica's generation_stats: any replica's, or the one that has `adapter` loaded (Serve routes there once
    it knows, and by chance before)."""
    from ray import serve

    handle = serve.get_deployment_handle("ModelServer", app_name="vray").options(multiplexed_model_id=adapter)
    deadline = time.time() + 120  # loading the adapter takes a while on a busy machine
    while True:
        stats = handle.generation_stats.remote().result()
        if not adapter or adapter in stats["adapters"]:
            return stats
        if time.time() > deadline:
            raise AssertionError(f"no replica has {adapter!r} loaded")
        time.sleep(0.1)


def _routed_by_adapter(adapter: str, pid: int) -> None:
    """Wait until Serve's routers know which replica holds `adapter` (five calls in a row land there)."""
    from ray import serve

    handle = serve.get_deployment_handle("ModelServer", app_name="vray").options(multiplexed_model_id=adapter)
    deadline, streak = time.time() + 60, 0
    while streak < 5 and time.time() < deadline:
        streak = streak + 1 if handle.generation_stats.remote().result()["pid"] == pid else 0
    assert streak == 5, f"Serve does not route {adapter!r} to the replica that holds it"


def _replica_adapters() -> dict[int, list[str]]:
    seen: dict[int, list[str]] = {}
    for _ in range(12):
        stats = _stats()
        seen[stats["pid"]] = stats["adapters"]
    return seen


def _settled(adapter: str) -> dict:
    """The stats of `adapter`'s replica once its token counter has stopped moving."""
    last = _stats(adapter)
    deadline = time.time() + 60
    while time.time() < deadline:
        time.sleep(0.5)
        now = _stats(adapter)
        if now["pid"] == last["pid"] and now["generated_tokens"] == last["generated_tokens"]:
            return now
        last = now
    raise AssertionError(f"the replica kept generating: {last}")


def test_a_stream_leaves_room_for_batches_and_stops_when_its_client_goes(served):
    # Both requests name adapter delta, so Serve routes them to the one replica that loads it. The tiny model never
    # writes its end token greedily: unless it is stopped, the stream generates all 4000 tokens.
    endpoint, _ = served
    model, budget = "tiny:qwen2_5_vl:delta", 4000
    sock = _raw_stream(endpoint.url, {"model": model, "messages": _messages(), "max_tokens": budget, "temperature": 0})
    start = _stats("delta")  # the stream's replica, once it has loaded delta
    deadline = time.time() + 120
    while _stats("delta")["generated_tokens"] == start["generated_tokens"] and time.time() < deadline:
        time.sleep(0.2)
    _routed_by_adapter("delta", start["pid"])
    # a batched request on the same replica completes while the stream is still going
    r = _post(endpoint.url, {"model": model, "messages": _messages(), "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    during = _stats("delta")
    assert during["pid"] == start["pid"] and during["generated_tokens"] - start["generated_tokens"] < budget
    assert [pid for pid, names in _replica_adapters().items() if "delta" in names] == [start["pid"]]
    # the client goes away: the replica stops generating within 8 tokens
    sock.close()
    closed = _stats("delta")
    stopped = _settled("delta")
    assert stopped["pid"] == closed["pid"] == start["pid"]
    assert closed["generated_tokens"] > during["generated_tokens"]  # it was still generating when the client left
    assert stopped["generated_tokens"] - closed["generated_tokens"] <= 8, (closed, stopped)
    assert stopped["generated_tokens"] - start["generated_tokens"] < budget


def test_a_call_is_retried_once_when_its_replica_dies():
    import asyncio

    from ray.exceptions import ActorDiedError

    from vray.infer.engine import RequestFailure
    from vray.serve.app import _on_a_live_replica

    def replicas(*outcomes):
        left = list(outcomes)

        async def attempt():
            outcome = left.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        return attempt

    assert asyncio.run(_on_a_live_replica(replicas(ActorDiedError(), "first chunk"))) == "first chunk"
    failed = asyncio.run(_on_a_live_replica(replicas(ActorDiedError(), ActorDiedError(), "never")))
    assert isinstance(failed, RequestFailure) and failed.status == 503 and "failed twice" in failed.message


def test_ground_endpoint(served):
    endpoint, _ = served
    r = _post(endpoint.url, {"image": _png(), "phrase": "red square", "max_tokens": 8}, path="/v1/ground")
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"boxes", "text"} and isinstance(r.json()["boxes"], list)


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role 'robot'"),
    ({"messages": _messages() + [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _png()}}, {"type": "image_url", "image_url": {"url": _png()}}]}]},
     400, "more than 2 images"),
    ({"messages": _messages(image="data:image/png;base64," + base64.b64encode(b"not an image").decode())}, 400,
     "cannot be decoded"),
    ({"messages": _messages(image=_png(size=(1024, 1024)))}, 413, "1024x1024 pixels"),
    ({"messages": _messages(image="https://evil.example.com/a.png")}, 400, "not allowed"),
    ({"model": "someone-else", "messages": _messages()}, 404, "not served here"),
    ({"model": "tiny:qwen2_5_vl:gamma", "messages": _messages()}, 404, "no adapter named 'gamma'"),
    ({"messages": _messages(), "temperature": -1}, 400, "temperature"),
    ({"messages": _messages(), "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": _messages(), "max_tokens": 100_000}, 400, "100,000 leaves no room for the prompt in serving.maxModelLen (8,192)"),
    ({"messages": _messages(image=png_claiming(4000, 3000))}, 413, "4000x3000 pixels, over the limit"),
    ({"messages": _messages(), "chat_template_kwargs": {"chat_template": "{{ 'x' }}"}}, 400,
     "chat_template_kwargs.chat_template: not accepted"),
])
def test_bad_requests_get_a_4xx_that_says_what_to_fix(served, body, status, needle):
    endpoint, _ = served
    r = _post(endpoint.url, body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_keys_body_limits_and_malformed_json(served):
    endpoint, _ = served
    assert _post(endpoint.url, {"messages": _messages()}, headers={}).status_code == 401
    assert _post(endpoint.url, {"messages": _messages()}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(endpoint.url + "/v1/models", timeout=30).status_code == 401
    assert httpx.get(endpoint.url + "/healthz", timeout=30).status_code == 200  # health checks need no key
    bad = httpx.post(endpoint.url + "/v1/chat/completions", content=b"{not json", headers=AUTH, timeout=30)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    big = httpx.post(endpoint.url + "/v1/chat/completions", content=b"x" * (3 * 1024 * 1024), headers=AUTH, timeout=30)
    assert big.status_code == 413 and "over the limit" in big.json()["error"]["message"]
    # still answering after all of that
    assert _post(endpoint.url, {"messages": _messages(), "max_tokens": 2}).status_code == 200


def test_abusive_requests_mixed_with_valid_ones_get_4xx_and_the_replicas_stay_up(served):
    """A bounded mix on 127.0.0.1: every abusive kind beside valid requests; no 5xx, and no replica restarts."""
    from ray import serve

    endpoint, target = served
    handle = serve.get_deployment_handle("ModelServer", app_name="vray")
    pids = {handle.pid.remote().result() for _ in range(8)}
    abusive = abusive_requests(endpoint.url, AUTH, target.base_id, max_body_bytes=2 * 1024 * 1024, max_model_len=8192)

    def valid(i: int) -> int:
        return _post(endpoint.url, {"messages": _messages(text=f"What colour is square {i}?"), "max_tokens": 3}).status_code

    jobs = [("valid", valid, 200)] * 12 + [(kind, call, status) for kind, (call, status) in abusive.items()] * 2
    with ThreadPoolExecutor(6) as pool:
        futures = [(kind, status, pool.submit(call, i)) for i, (kind, call, status) in enumerate(jobs)]
        codes = [(kind, status, f.result(timeout=300)) for kind, status, f in futures]
    assert all(got == status for _, status, got in codes), [c for c in codes if c[1] != c[2]]
    assert httpx.get(endpoint.url + "/healthz", timeout=30).status_code == 200
    assert valid(0) == 200
    assert {handle.pid.remote().result() for _ in range(8)} == pids  # the same replicas: none crashed or restarted


def test_prometheus_metrics_through_ray(served):
    port = os.environ.get("VRAY_TEST_METRICS_PORT")
    if not port:
        pytest.skip("the session's Ray head exports no metrics port")
    endpoint, _ = served
    assert _post(endpoint.url, {"messages": _messages(), "max_tokens": 2}).status_code == 200
    invented = _post(endpoint.url, {"model": "tiny:qwen2_5_vl:no-such-adapter-9f3", "messages": _messages()})
    assert invented.status_code == 404
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if "vray_completion_tokens" in text and 'model="unknown"' in text:
            break
        time.sleep(2)
    assert "vray_completion_tokens" in text and 'outcome="ok"' in text
    # a name a client made up is counted under one fixed label, never as a label of its own
    assert 'model="unknown"' in text and "no-such-adapter-9f3" not in text


def test_a_killed_replica_is_replaced_while_requests_keep_succeeding(served):
    from ray import serve

    endpoint, _ = served
    handle = serve.get_deployment_handle("ModelServer", app_name="vray")
    pids = {handle.pid.remote().result() for _ in range(8)}
    assert len(pids) == 2
    victim = sorted(pids)[0]

    def one(i: int) -> int:
        if i % 2:
            return _post(endpoint.url, {"messages": _messages(), "max_tokens": 4}).status_code
        # streams too are retried on the other replica when theirs dies before their first chunk
        with httpx.stream("POST", endpoint.url + "/v1/chat/completions", headers=AUTH, timeout=120,
                          json={"messages": _messages(), "max_tokens": 4, "stream": True}) as r:
            body = r.read().decode()
        assert '"error"' not in body and body.rstrip().endswith("data: [DONE]"), body
        return r.status_code

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(24)]
        time.sleep(2)
        os.kill(victim, signal.SIGKILL)
        codes = [f.result() for f in futures]
    assert codes.count(200) == len(codes), codes
    deadline = time.time() + 120
    while time.time() < deadline:
        app = serve.status().applications["vray"]
        replicas = app.deployments["ModelServer"].replica_states
        if replicas.get("RUNNING", 0) == 2:
            break
        time.sleep(1)
    assert replicas.get("RUNNING", 0) == 2
    fresh = {handle.pid.remote().result() for _ in range(8)}
    assert victim not in fresh


def test_written_config_deploys_with_vray_serve_config(served, runs, tmp_path):
    from vray.serve.config import read_config

    endpoint, _ = served
    port = endpoint.url.rsplit(":", 1)[1]
    config = tmp_path / "serve.yaml"
    proc = run_cli("serve", runs["main"].uri, "--write-config", str(config), "--port", port, "--max-replicas", "3",
                   "--adapters-dir", str(runs["adapters"]))
    assert proc.returncode == 0, proc.stderr
    assert "engine: transformers (the replicas get no GPU" in proc.stderr  # what --engine auto picked, and why
    parsed = read_config(config)  # what `serve run` / `serve deploy` accept
    app = parsed["applications"][0]
    assert app["import_path"] == "vray.serve.app:app_builder" and app["args"]["target"] == runs["main"].uri
    server = next(d for d in app["deployments"] if d["name"] == "ModelServer")
    assert server["autoscaling_config"]["max_replicas"] == 3 and server["ray_actor_options"]["num_cpus"] == 1
    assert KEY not in config.read_text()
    proc = run_cli("serve", "--config", str(config), "--detach", env={"VRAY_API_KEY": KEY}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = _post(endpoint.url, {"model": "tiny:qwen2_5_vl:beta", "messages": _messages(), "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert json.loads(httpx.get(endpoint.url + "/v1/models", headers=AUTH, timeout=30).text)["data"][0]["id"] == "main-run"
