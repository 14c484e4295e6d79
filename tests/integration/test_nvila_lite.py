"""NVILA-Lite end to end on a local Ray cluster: `vray train` (full fine-tuning, two CPU workers) on the tiny
checkpoint in the published -hf layout, then `vray serve` of that run answering over HTTP (the OpenAI chat API and
/v1/ground), with an API key and Ray's token authentication on."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from tests.conftest import run_cli, shutdown_serve
from vray.cluster import free_port
from vray.data import synthetic
from vray.data.io import read_jsonl
from vray.storage.rundir import RunDir

pytestmark = pytest.mark.slow
DATA = "synthetic:grounding?train=8&eval=2"
KEY = "nv1la"


def _data_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


@pytest.fixture(scope="module")
def nvila_run(ray_head, tmp_path_factory) -> RunDir:
    out = tmp_path_factory.mktemp("nvila-runs")
    spec = {
        "architecture": {"name": "nvila-lite", "size": "2B"}, "model": {"source": "tiny:nvila_lite"},
        "trainingMode": {"type": "Full"}, "compute": {"precisionType": "Float32"}, "task": "phrase_grounding",
        "data": {"train": DATA},
        "hyperparameters": {"epochs": 2, "learningRate": 0.003, "batchSize": 4, "gradientAccumulation": 1,
                            "optimizer": "AdamW"},
        "evaluation": {"maxNewTokens": 8, "temperature": 0, "repetitionPenalty": 1.0},
        "cluster": {"workers": 2, "cpusPerWorker": 1}, "output": str(out), "name": "nvila-run",
    }
    path = out / "nvila.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = run_cli("train", str(path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out / "nvila-run")
    return RunDir(out / "nvila-run")


@pytest.mark.timeout(900)
def test_vray_train_fine_tunes_nvila_lite_on_two_workers_and_the_loss_falls(nvila_run):
    records = nvila_run.read_metrics()
    start = next(r for r in records if r.get("event") == "start")
    assert start["workers"] == 2
    evals = [r for r in records if "eval/loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == start["total_steps"]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"], [r["eval/loss"] for r in evals]
    assert (nvila_run.final / "model.safetensors").exists()


@pytest.mark.timeout(600)
def test_vray_serve_answers_nvila_lite_over_the_openai_api_and_grounds_in_pixels(nvila_run):

    port = free_port()
    proc = run_cli("serve", str(nvila_run.root), "--detach", "--port", str(port), "--api-key", KEY, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    url = proc.stdout.strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        sample = read_jsonl(synthetic.split_paths(DATA)[1])[0]
        image = sample.images[0]
        width, height = Image.open(image).size
        chat = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image)}},
                                                          {"type": "text", "text": sample.conversation[0].text}]}],
                "max_tokens": 16}
        assert httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=120).status_code == 401
        ok = httpx.post(f"{url}/v1/chat/completions", json=chat, headers=headers, timeout=120)
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert body["model"] == "nvila-run" and body["choices"][0]["message"]["role"] == "assistant"
        # the prompt holds the image's tiles: 121 visual tokens and a newline each, so far more than the text
        assert body["usage"]["prompt_tokens"] > 121 and body["usage"]["completion_tokens"] >= 1

        phrase = sample.conversation[0].text.removeprefix("Locate the ").rstrip(".")
        ground = httpx.post(f"{url}/v1/ground", json={"image": _data_url(image), "phrase": phrase, "max_tokens": 48},
                            headers=headers, timeout=120)
        assert ground.status_code == 200, ground.text
        boxes = ground.json()["boxes"]
        assert isinstance(boxes, list)
        for box in boxes:  # nvila-rel1 fractions come back in the image's pixels
            x0, y0, x1, y1 = box["bbox"]
            assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height, (box, width, height)
    finally:
        shutdown_serve()
