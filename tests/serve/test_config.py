"""Serve configs without a cluster: replica sizing from the planner's numbers, autoscaling from the run, the
vray application and the vLLM application (checked against Ray Serve's and Ray Serve LLM's own schemas), and the
local Python API."""

from __future__ import annotations

import io
import json
from contextlib import contextmanager

import pytest
from PIL import Image

from vray.errors import VrayError
from vray.infer.target import ServeTarget, resolve_target
from vray.serve.config import AppArgs, serve_config, validate_serve_config, vray_application
from vray.serve.options import ServeOptions
from vray.serve.vllm import validate_llm_configs, vllm_application
from vray.testing.runs import write_adapter_run


def _base(name: str, size: str) -> ServeTarget:
    from vray.archs import registry

    arch = registry.get(name, size)
    return resolve_target(arch.repo_id, architecture=f"{name}:{size}")


@pytest.mark.parametrize(("name", "size", "gpu", "gpus"), [
    ("qwen3vl", "8B", "H100-80GB", 1),
    ("qwen3vl", "32B", "A100-40GB", 4),  # 64 GiB of bf16 weights: two 40 GB GPUs are not enough with a KV cache
    ("qwen3vl", "32B", "H100-80GB", 2),
    ("qwen3.5", "35B-A3B", "A100-80GB", 2),
])
def test_replicas_of_large_models_span_several_gpus(name, size, gpu, gpus):
    target = _base(name, size)
    options = ServeOptions.resolve(target, {"gpu": gpu, "maxModelLen": 8192, "maxBatchSize": 8})
    replica = options.replica
    assert replica.num_gpus == gpus and replica.tensor_parallel == gpus
    from vray.plan.gpus import CATALOG

    usable = CATALOG[gpu].memory_bytes * gpus
    assert replica.weights_bytes + replica.kv_bytes < usable
    opts = replica.ray_actor_options()
    assert opts["num_gpus"] == gpus and opts["accelerator_type"] == CATALOG[gpu].ray_accelerator_types[0]


def test_a_model_too_large_for_eight_gpus_is_refused_with_the_fix():
    with pytest.raises(VrayError, match="more than 8x L4-24GB"):
        ServeOptions.resolve(_base("qwen3vl", "235B-A22B"), {"gpu": "L4-24GB"})


def test_vray_application_is_a_valid_serve_config_with_autoscaling(tmp_path):
    run = write_adapter_run(tmp_path, "r", serving={"minReplicas": 1, "maxReplicas": 4, "upscaleDelayS": 5})
    target = resolve_target(run.uri)
    options = ServeOptions.resolve(target, {"maxReplicas": 6})  # the command line wins over the run
    app = vray_application(AppArgs(run.uri, adapters_dir="/x"), options)
    config = validate_serve_config(serve_config([app], "0.0.0.0", 8000))
    server = config["applications"][0]["deployments"][0]
    assert server["autoscaling_config"] == {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 6,
                                            "target_ongoing_requests": 8, "upscale_delay_s": 5.0,
                                            "downscale_delay_s": 300.0}
    assert server["ray_actor_options"] == {"num_cpus": 1}
    assert config["applications"][0]["args"] == {"target": run.uri, "api_key_env": "VRAY_API_KEY", "adapters_dir": "/x"}
    with pytest.raises(VrayError, match="not a valid Ray Serve config"):
        validate_serve_config({"applications": [{**app, "deployments": [{"name": "ModelServer", "max_ongoing_requests": "lots"}]}]})


def test_app_builder_rejects_unknown_args():
    from vray.serve.app import app_builder

    with pytest.raises(VrayError, match="unknown key.*trget"):
        app_builder({"trget": "x"})


def test_an_app_from_a_config_starts_only_with_its_key_or_insecure(monkeypatch):
    from vray.serve.app import app_builder

    monkeypatch.delenv("VRAY_API_KEY", raising=False)
    with pytest.raises(VrayError, match="no API key: set VRAY_API_KEY .* `insecure: true`"):
        app_builder({"target": "tiny:qwen2_5_vl"})
    with pytest.raises(VrayError, match="insecure is 'yes'"):
        app_builder({"target": "tiny:qwen2_5_vl", "insecure": "yes"})
    assert app_builder({"target": "tiny:qwen2_5_vl", "insecure": True}) is not None
    monkeypatch.setenv("VRAY_API_KEY", "k")
    assert app_builder({"target": "tiny:qwen2_5_vl"}) is not None
    assert AppArgs("tiny:qwen2_5_vl", insecure=True).to_config()["insecure"] is True


@pytest.mark.parametrize(("host", "url", "exposed"), [
    ("127.0.0.1", "http://127.0.0.1:8000", False),
    ("::1", "http://[::1]:8000", False),
    ("[::1]", "http://[::1]:8000", False),
    ("127.0.0.2", "http://127.0.0.2:8000", False),
    ("::", "http://[::1]:8000", True),
    ("0.0.0.0", "http://127.0.0.1:8000", True),
    ("fd00::5", "http://[fd00::5]:8000", True),
])
def test_ipv6_hosts_get_bracketed_urls_and_only_loopback_needs_no_key(host, url, exposed):
    from vray.serve.runner import _url, check_exposure

    assert _url(host, 8000) == url
    if exposed:
        with pytest.raises(VrayError, match="exposes the model"):
            check_exposure(host, None, insecure=False)
    else:
        check_exposure(host, None, insecure=False)


def test_vllm_application_for_a_lora_run_on_s3_and_for_merged_runs(tmp_path):
    run = write_adapter_run(tmp_path, "fine", serving={"gpu": "H100-80GB", "maxAdapters": 3})
    target = resolve_target(run.uri)
    options = ServeOptions.resolve(target)
    with pytest.raises(VrayError, match="loads LoRA adapters from cloud storage"):
        vllm_application(target, options)
    app = vllm_application(target, options, lora_prefix="s3://bucket/adapters/")
    validate_llm_configs(app)
    validate_serve_config(serve_config([app]))
    llm = app["args"]["llm_configs"][0]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    assert llm["model_loading_config"] == {"model_id": "tiny:qwen2_5_vl", "model_source": "tiny:qwen2_5_vl"}
    assert llm["lora_config"] == {"dynamic_lora_loading_path": "s3://bucket/adapters", "max_num_adapters_per_replica": 3}
    assert llm["engine_kwargs"]["enable_lora"] and llm["engine_kwargs"]["max_lora_rank"] == 16
    assert llm["engine_kwargs"]["tensor_parallel_size"] == 1 and llm["accelerator_type"] == "H100"
    merged = vllm_application(target, options, merged="/models/fine-merged")
    assert "lora_config" not in merged["args"]["llm_configs"][0]
    assert merged["args"]["llm_configs"][0]["model_loading_config"]["model_source"] == "/models/fine-merged"
    with pytest.raises(VrayError, match="vLLM serves on GPUs"):
        vllm_application(target, ServeOptions.resolve(target, {"gpu": None}), lora_prefix="s3://b/a")


def test_vllm_needs_a_merge_for_vision_lora(tmp_path):
    run = write_adapter_run(tmp_path, "vis", lora={"scope": ["language", "vision"]}, serving={"gpu": "L4-24GB"})
    target = resolve_target(run.uri)
    with pytest.raises(VrayError, match="vision tower or projector.*--merge"):
        vllm_application(target, ServeOptions.resolve(target), lora_prefix="s3://b/a")


def test_write_config_for_vllm_from_the_command_line(tmp_path):
    from tests.conftest import run_cli

    run = write_adapter_run(tmp_path, "cli")
    out = tmp_path / "vllm.yaml"
    proc = run_cli("serve", run.uri, "--engine", "vllm", "--gpu", "A10G-24GB", "--merge", "--write-config", str(out))
    assert proc.returncode == 0, proc.stderr
    import yaml

    app = yaml.safe_load(out.read_text())["applications"][0]
    source = app["args"]["llm_configs"][0]["model_loading_config"]["model_source"]
    assert source == str(run.root / "export" / "merged") and (run.root / "export" / "merged" / "config.json").exists()
    proc = run_cli("serve", run.uri, "--engine", "vllm", "--write-config", str(out))
    assert proc.returncode == 1 and "vLLM serves on GPUs" in proc.stderr


def _png() -> Image.Image:
    return Image.new("RGB", (96, 64), (20, 160, 40))


@pytest.mark.parametrize("quantize", [None, "4bit"])
def test_python_api_answers_an_image_and_a_prompt(tmp_path, quantize):
    import vray

    run = write_adapter_run(tmp_path, "py", task="phrase_grounding")
    model = vray.load(run.uri, device="cpu", quantize=quantize)
    answer = model(_png(), "Locate the green square.", max_tokens=5)
    assert answer.text and answer.completion_tokens >= 1 and isinstance(answer.boxes, list)
    path = tmp_path / "x.png"
    _png().save(path)
    buf = io.BytesIO()
    _png().save(buf, format="PNG")
    same = model(str(path), "Locate the green square.", max_tokens=5)
    assert same.text == answer.text  # greedy: a path and a PIL image are the same input
    with pytest.raises(VrayError, match="no such file"):
        model(str(tmp_path / "missing.png"), "hi")
    assert json.loads(json.dumps(answer.boxes)) == answer.boxes
    if quantize is None:  # image URLs only from the hosts it allows
        with _serving_files(tmp_path) as url:
            with pytest.raises(VrayError, match="host '127.0.0.1' is not allowed.*allowed_image_hosts"):
                model(url + "/x.png", "Locate the green square.")
            allowed = vray.load(run.uri, device="cpu", allowed_image_hosts=["127.0.0.1"])
            assert allowed(url + "/x.png", "Locate the green square.", max_tokens=5).text == answer.text


@contextmanager
def _serving_files(folder):
    """An HTTP server on 127.0.0.1 for the files of `folder`; its base URL."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()




@pytest.mark.parametrize(("gpus", "has_vllm", "refusal", "engine", "why"), [
    (0, True, None, "transformers", "the replicas get no GPU"),
    (1, False, None, "transformers", "vLLM is not installed here"),
    (2, True, "the vLLM OpenAI app checks no API key", "transformers", "not vLLM: the vLLM OpenAI app checks no API key"),
    (2, True, None, "vllm", "engine: vLLM (2 GPU(s) per replica"),
])
def test_engine_auto_picks_vllm_on_gpus_where_it_is_installed(gpus, has_vllm, refusal, engine, why):
    from vray.serve.command import pick_engine

    picked, line = pick_engine(gpus=gpus, has_vllm=has_vllm, refusal=refusal)
    assert picked == engine and why in line and "\n" not in line


def test_engine_auto_serves_a_lora_run_with_transformers_when_vllm_cannot_take_it_as_given(tmp_path, monkeypatch):
    from rich.console import Console

    from vray.serve import command

    monkeypatch.setattr(command, "vllm_installed", lambda: True)  # a GPU machine with vLLM, as far as auto knows
    app = command.app_args(write_adapter_run(tmp_path, "lora").uri, serving={"gpu": "A10G-24GB"})
    for api_key, why in ((None, "vLLM loads LoRA adapters from cloud storage"), ("k", "checks no API key")):
        said = io.StringIO()
        out = command.serve(app, given="lora", api_key=api_key, write_config=tmp_path / "serve.yaml",
                            console=Console(file=said, width=400))
        line = said.getvalue().splitlines()[0]
        assert line.startswith("engine: transformers, not vLLM:") and why in line
        assert "import_path: vray.serve.app:app_builder" in out.written.read_text()


def test_vllm_refuses_an_architecture_vray_implements_and_auto_serves_it_with_transformers():
    from vray.serve.command import pick_engine
    from vray.serve.vllm import vllm_family_refusal

    target = resolve_target("tiny:nvila_lite")
    assert target.arch.implemented_by_vray and not resolve_target("tiny:qwen2_5_vl").arch.implemented_by_vray
    with pytest.raises(VrayError, match="vLLM has no NVILA-Lite model.*--engine transformers"):
        vllm_application(target, ServeOptions.resolve(target, {"gpu": "H100-80GB"}))
    engine, line = pick_engine(gpus=1, has_vllm=True, refusal=vllm_family_refusal(target))
    assert engine == "transformers" and "NVILA-Lite" in line
