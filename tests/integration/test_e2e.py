"""The first slice on a real local Ray cluster: train with Ray Train, serve with Ray Serve, query over HTTP."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from tests.conftest import run_cli, shutdown_serve
from vray.cluster import free_port
from vray.data import synthetic
from vray.data.io import read_jsonl
from vray.storage.rundir import RunDir

pytestmark = pytest.mark.slow


def _data_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _chat(url: str, image: str, question: str, headers: dict | None = None, **extra) -> httpx.Response:
    payload = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                         {"type": "text", "text": question}]}], **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=payload, headers=headers or {}, timeout=120)


@pytest.mark.timeout(900)
def test_demo_fine_tuned_beats_untrained_and_answers_over_http(ray_head, tmp_path):
    from vray.demo import run_demo
    from vray.serve.runner import shutdown

    log = io.StringIO()
    result = run_demo(Console(file=log, width=120), output=str(tmp_path), stop_server=False)
    try:
        assert result.exact_match_after > result.exact_match_before
        assert result.exact_match_before < 0.2 and result.exact_match_after >= 0.5
        assert result.answer.strip()
        text = log.getvalue()
        assert "untrained (step 0)" in text and "answer:" in text

        url, model = result.url, result.model_id
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == model

        # The fine-tuned model answers held-out questions through the endpoint (greedy: the run's settings).
        held_out = read_jsonl(synthetic.split_paths("synthetic:vqa")[1])[:8]
        answers = [_chat(url, _data_url(s.images[0]), s.conversation[0].text).json() for s in held_out]
        hits = sum(a["choices"][0]["message"]["content"].strip() == s.answer.text for a, s in zip(answers, held_out))
        assert hits >= 4
        usage = answers[0]["usage"]
        assert usage["prompt_tokens"] > 16 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

        # The official OpenAI client works against it unchanged.
        from openai import OpenAI

        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        completion = client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(held_out[0].images[0])}},
            {"type": "text", "text": held_out[0].conversation[0].text}]}], max_tokens=4)
        assert completion.choices[0].message.content.strip() in synthetic.COLOURS

        # Bad requests get a 4xx naming the problem; the server keeps serving.
        bad = _chat(url, "data:image/png;base64,AAAA", "What colour?")
        assert bad.status_code == 400 and "cannot be decoded" in bad.json()["error"]["message"]
        wrong = _chat(url, _data_url(held_out[0].images[0]), "q", model="someone-else")
        assert wrong.status_code == 404 and model in wrong.json()["error"]["message"]
        remote = _chat(url, "http://example.com/cat.png", "q")
        assert remote.status_code == 400 and "not allowed" in remote.json()["error"]["message"]
        bad_param = _chat(url, _data_url(held_out[0].images[0]), "q", top_p=3)
        assert bad_param.status_code == 400 and "top_p" in bad_param.json()["error"]["message"]
        assert httpx.post(f"{url}/v1/chat/completions", content=b"{oops", timeout=30).status_code == 400
        assert _chat(url, _data_url(held_out[0].images[0]), held_out[0].conversation[0].text).status_code == 200
    finally:
        shutdown()


@pytest.fixture(scope="module")
def cli_run(ray_head, tmp_path_factory) -> RunDir:
    out = tmp_path_factory.mktemp("cli-runs")
    proc = run_cli("train", "jobs/tiny-cpu.yaml", "--set", f"output={out}", "--set", "name=cli-run",
                   "--set", "data.train=synthetic:vqa?train=32&eval=8", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last == str(out / "cli-run")  # the run directory is the last line printed
    return RunDir(Path(last))


@pytest.mark.timeout(900)
def test_cli_train_joins_the_cluster_and_writes_the_run_directory(cli_run):
    assert [s for s, _ in cli_run.complete_checkpoints()] == [4, 8]
    assert cli_run.best_checkpoint() is not None and (cli_run.final / "adapter_model.safetensors").exists()
    assert cli_run.curves.exists()
    start = next(r for r in cli_run.read_metrics() if r.get("event") == "start")
    assert start["workers"] == 1  # jobs/tiny-cpu.yaml asks for one CPU worker


@pytest.mark.timeout(600)
def test_cli_serve_detached_with_an_api_key(cli_run):

    port = free_port()
    proc = run_cli("serve", str(cli_run.root), "--detach", "--port", str(port), "--api-key", "s3cret", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    url = proc.stdout.strip().splitlines()[-1]
    assert url == f"http://127.0.0.1:{port}"
    # quiet: neither Ray's nor Serve's INFO lines, nor the raylet's messages, reach the user's terminal
    noise = [line for line in (proc.stdout + proc.stderr).splitlines() if re.search(r"\bINFO\b|\(raylet\)", line)]
    assert not noise, noise
    try:
        sample = read_jsonl(synthetic.split_paths("synthetic:vqa?train=32&eval=8")[1])[0]
        image = _data_url(sample.images[0])
        assert _chat(url, image, "What colour?").status_code == 401
        assert httpx.get(f"{url}/v1/models").status_code == 401
        ok = _chat(url, image, sample.conversation[0].text, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["model"] == "cli-run"
        assert httpx.get(f"{url}/healthz").status_code == 200  # probes need no key
    finally:
        shutdown_serve()


def test_serving_beyond_loopback_needs_a_key(cli_run):
    proc = run_cli("serve", str(cli_run.root), "--host", "0.0.0.0", timeout=120)
    assert proc.returncode == 1 and "--api-key" in proc.stderr and "Traceback" not in proc.stderr


def test_train_refuses_a_gpu_plan_the_cluster_cannot_place(ray_head, tmp_path):
    proc = run_cli("train", "jobs/tiny-cpu.yaml", "--set", f"output={tmp_path}", "--set", "cluster.gpu=A100-80GB",
                   timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "needs 1 GPU(s) on 1 node(s)" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing was written
