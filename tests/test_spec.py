"""RunSpec: defaults, every bad input named with its fix, YAML / run.json / --set loading."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli
from vray.errors import SpecError
from vray.spec import load_spec, require_for_training, validate_spec


def problems(data: dict) -> list[str]:
    with pytest.raises(SpecError) as exc:
        validate_spec(data)
    return exc.value.problems


def test_defaults_follow_the_seed_advice():
    spec = validate_spec({})
    assert spec.trainingMode.type == "LoRA"
    assert spec.compute.precisionType == "BFloat16"
    assert spec.hyperparameters.optimizer == "AdamW"
    assert spec.quantization.enabled is False and spec.quantization.type == "NF4"
    assert (spec.architecture.name, spec.architecture.size) == ("qwen3.5", "4B")
    assert spec.lora.rank == 16 and spec.lora.alpha == 32 and spec.lora.dropout == 0.0
    # Enabling quantization without naming a type gives NF4.
    assert validate_spec({"quantization": {"enabled": True}}).quantization.type == "NF4"


def test_resolved_fills_name_output_source_and_prompt(monkeypatch, tmp_path):
    monkeypatch.setenv("VRAY_STORAGE", str(tmp_path))
    spec = validate_spec({"architecture": {"name": "qwen3vl", "size": "8B"}, "data": {"train": "synthetic:grounding"}})
    r = spec.resolved(now=datetime(2026, 1, 2, 3, 4, 5))
    assert r.task == "phrase_grounding"
    assert r.name == "qwen3vl-8B-phrase_grounding-20260102-030405"
    assert r.output == str(tmp_path)
    assert r.run_dir == f"{tmp_path}/{r.name}"
    assert r.model.source == "Qwen/Qwen3-VL-8B-Instruct"
    assert "bounding box" in r.systemPrompt
    assert r.lora.targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    monkeypatch.delenv("VRAY_STORAGE")
    assert spec.resolved().output == str(Path("~/vray-runs").expanduser())


def test_unknown_architecture_lists_the_valid_ones():
    (msg,) = problems({"architecture": {"name": "qwen3", "size": "4B"}})
    assert msg.startswith("architecture.name: 'qwen3'")
    for name in ("qwen3.5", "qwen3vl", "qwen2.5vl", "nvila-lite", "cosmos-reason1", "cosmos-reason2", "internvl3.5"):
        assert name in msg


def test_unknown_size_lists_the_sizes_of_that_architecture():
    (msg,) = problems({"architecture": {"name": "qwen3vl", "size": "7B"}})
    assert "architecture.size: '7B'" in msg
    assert "2B, 4B, 8B, 32B, 30B-A3B, 235B-A22B" in msg


def test_lora_on_nvila_is_refused_and_full_is_accepted():
    (msg,) = problems({"architecture": {"name": "nvila-lite", "size": "2B"}})
    assert msg.startswith("trainingMode.type") and "full fine-tuning only" in msg
    spec = validate_spec({"architecture": {"name": "nvila-lite", "size": "2B"}, "trainingMode": {"type": "Full"}})
    assert spec.trainingMode.type == "Full"


def test_quantization_with_full_fine_tuning_is_refused():
    (msg,) = problems({"trainingMode": {"type": "Full"}, "quantization": {"enabled": True, "type": "FP4"}})
    assert msg.startswith("quantization.enabled") and "LoRA" in msg


@pytest.mark.parametrize(
    ("block", "key", "value", "needle"),
    [
        ("hyperparameters", "learningRate", 0, "greater than 0"),
        ("hyperparameters", "learningRate", -1e-4, "greater than 0"),
        ("hyperparameters", "epochs", 0, "greater than 0"),
        ("hyperparameters", "epochs", -3, "greater than 0"),
        ("hyperparameters", "batchSize", 0, "greater than or equal to 1"),
        ("evaluation", "topP", 0, "(0, 1]"),
        ("evaluation", "topP", 1.01, "(0, 1]"),
        ("evaluation", "temperature", -0.5, "greater than or equal to 0"),
        ("evaluation", "repetitionPenalty", 0, "must be > 0"),
        ("evaluation", "repetitionPenalty", -1, "must be > 0"),
    ],
)
def test_out_of_range_values_name_the_field_and_the_value(block, key, value, needle):
    (msg,) = problems({block: {key: value}})
    assert msg.startswith(f"{block}.{key}: got {value!r}")
    assert needle in msg


def test_edges_that_are_allowed():
    spec = validate_spec({"evaluation": {"topP": 1, "temperature": 0, "repetitionPenalty": 0.5}, "hyperparameters": {"batchSize": 1}})
    assert spec.evaluation.topP == 1 and spec.evaluation.temperature == 0


def test_unknown_keys_say_which_key_was_probably_meant():
    msgs = problems({"hyperparams": {}, "trainingmode": {"type": "LoRA"}, "hyperparameters": {"learning_rate": 1e-4}})
    assert any(m.startswith("hyperparams: unknown key (did you mean 'hyperparameters'?)") for m in msgs)
    assert any(m.startswith("trainingmode: unknown key (did you mean 'trainingMode'?)") for m in msgs)
    assert any(m.startswith("hyperparameters.learning_rate: unknown key (did you mean 'learningRate'?)") for m in msgs)


def test_all_problems_are_reported_together():
    msgs = problems({"hyperparameters": {"learningRate": -1, "epochs": 0, "batchSize": 0, "lr": 1}, "evaluation": {"topP": 2}})
    fields = {m.split(":")[0] for m in msgs}
    assert fields == {"hyperparameters.learningRate", "hyperparameters.epochs", "hyperparameters.batchSize",
                      "hyperparameters.lr", "evaluation.topP"}


def test_choices_accept_any_capitalisation_and_reject_others():
    spec = validate_spec({"trainingMode": {"type": "lora"}, "compute": {"precisionType": "float16"}, "hyperparameters": {"optimizer": "adamw"}})
    assert (spec.trainingMode.type, spec.compute.precisionType, spec.hyperparameters.optimizer) == ("LoRA", "Float16", "AdamW")
    (msg,) = problems({"trainingMode": {"type": "QLoRA"}})
    assert "'LoRA' or 'Full'" in msg and "quantization.enabled" in msg


def test_tiny_source_must_match_the_architecture_family():
    (msg,) = problems({"architecture": {"name": "qwen3.5", "size": "4B"}, "model": {"source": "tiny:qwen2_5_vl"}})
    assert msg.startswith("model.source") and "tiny:qwen3_5" in msg
    assert validate_spec({"architecture": {"name": "cosmos-reason1", "size": "7B"}, "model": {"source": "tiny:qwen2_5_vl"}})


def test_yaml_file_and_set_overrides(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"architecture": {"name": "qwen2.5vl", "size": "7B"}, "task": "vqa"}))
    spec = load_spec(path, overrides=["hyperparameters.epochs=3", "evaluation.temperature=0.2", "lora.targets=[q_proj, v_proj]",
                                      "cluster.workers=4", "systemPrompt=Answer in one word."])
    assert spec.hyperparameters.epochs == 3 and isinstance(spec.hyperparameters.epochs, int)
    assert spec.evaluation.temperature == 0.2
    assert spec.lora.targets == ("q_proj", "v_proj")
    assert spec.cluster.workers == 4
    assert spec.systemPrompt == "Answer in one word."
    with pytest.raises(SpecError, match=r"hyperparameters.epoch: unknown key \(did you mean 'epochs'\?\)"):
        load_spec(path, overrides=["hyperparameters.epoch=3"])
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        load_spec(path, overrides=["epochs"])


def test_round_trip_through_yaml(tmp_path):
    spec = validate_spec({"architecture": {"name": "internvl3.5", "size": "8B"}, "task": "phrase_grounding",
                          "quantization": {"enabled": True}}).resolved()
    again = validate_spec(yaml.safe_load(spec.to_yaml()))
    assert again == spec


def _service_run_json(settings: dict) -> dict:
    """A saved run.json as the hosted service writes it: a flow of blocks, the model block holding the settings."""
    return {"flowId": "f1", "spec": {"blocks": [
        {"block": "dataset", "settings": {"datasetId": "d1"}, "style": {}},
        {"block": "model", "settings": settings, "style": {"x": 1}},
    ]}}


def test_run_json_model_block_with_task_data_and_output(tmp_path):
    settings = {
        "architecture": {"name": "qwen3vl", "size": "8B"},
        "trainingMode": {"type": "LoRA"},
        "quantization": {"enabled": True, "type": "NF4"},
        "compute": {"precisionType": "BFloat16"},
        "hyperparameters": {"epochs": 10, "learningRate": 0.0001, "batchSize": 8, "gradientAccumulation": 1, "optimizer": "AdamW"},
        "evaluation": {"maxNewTokens": 512, "topK": 50, "topP": 1, "temperature": 1, "repetitionPenalty": 1.05},
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_service_run_json(settings)))
    spec = load_spec(run_json=path, task="vqa", data="data/train.jsonl", output=str(tmp_path / "runs"))
    assert spec.architecture.size == "8B" and spec.quantization.enabled
    assert spec.hyperparameters.batchSize == 8 and spec.evaluation.repetitionPenalty == 1.05
    assert spec.task == "vqa" and spec.data.train == "data/train.jsonl" and spec.output == str(tmp_path / "runs")
    # The bare model block works too.
    path.write_text(json.dumps(settings))
    assert load_spec(run_json=path).architecture.name == "qwen3vl"


def test_run_json_with_a_key_outside_the_model_block(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"architecture": {"name": "qwen3vl", "size": "8B"}, "hyperparameter": {}}))
    with pytest.raises(SpecError, match="'hyperparameter' is not a model setting \\(did you mean 'hyperparameters'\\?\\)"):
        load_spec(run_json=path)


def test_training_needs_a_task_and_data():
    with pytest.raises(SpecError) as exc:
        require_for_training(validate_spec({}))
    assert any(p.startswith("task: required") for p in exc.value.problems)
    assert any(p.startswith("data.train: required") for p in exc.value.problems)
    with pytest.raises(SpecError, match="is phrase_grounding data but task is vqa"):
        require_for_training(validate_spec({"task": "vqa", "data": {"train": "synthetic:grounding"}}))


def test_cli_rejects_a_bad_spec_before_any_work(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({"architecture": {"name": "qwen3vl", "size": "9B"}, "task": "vqa",
                                    "data": {"train": "synthetic:vqa"}, "hyperparameters": {"learningRate": -1},
                                    "output": str(tmp_path / "runs")}))
    proc = run_cli("train", str(spec), timeout=120)
    assert proc.returncode == 1
    assert "architecture.size: '9B' is not a size of qwen3vl" in proc.stderr
    assert "hyperparameters.learningRate: got -1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing was created


def test_grounding_and_vqa_decode_greedily_unless_the_spec_says_otherwise():
    from vray.infer.target import resolve_target, run_target
    from vray.models.generate import GenerationSettings

    base = {"architecture": {"name": "qwen2.5vl", "size": "3B"}}
    for task, expected in (("phrase_grounding", (0.0, 1.0)), ("vqa", (0.0, 1.0)), ("freeform", (1.0, 1.05))):
        spec = validate_spec({**base, "task": task}).resolved()
        assert (spec.evaluation.temperature, spec.evaluation.repetitionPenalty) == expected, task
        assert validate_spec(yaml.safe_load(spec.to_yaml())).evaluation == spec.evaluation  # spec.yaml keeps them
        kwargs = GenerationSettings.from_evaluation(run_target(validate_spec({**base, "task": task}), None)
                                                    .evaluation).generate_kwargs()
        assert kwargs["do_sample"] is (task == "freeform") and kwargs["repetition_penalty"] == expected[1]
    # What a spec sets is honoured, for either field alone.
    spec = validate_spec({**base, "task": "vqa", "evaluation": {"temperature": 0.7}}).resolved()
    assert (spec.evaluation.temperature, spec.evaluation.repetitionPenalty) == (0.7, 1.0)
    spec = validate_spec({**base, "task": "phrase_grounding", "evaluation": {"repetitionPenalty": 1.2}}).resolved()
    assert (spec.evaluation.temperature, spec.evaluation.repetitionPenalty) == (0.0, 1.2)
    # A base model served or evaluated for a task gets the same defaults.
    target = resolve_target("tiny:qwen2_5_vl", task="phrase_grounding")
    assert (target.evaluation.temperature, target.evaluation.repetitionPenalty) == (0.0, 1.0)
