"""Run directories without training, for serving tests: one checkpoint of a randomly initialised LoRA adapter.

Each adapter gets its own seed, so two adapters of the same tiny base answer differently: a test can tell which
one a server applied. They are written in the trainer's format (spec.yaml, checkpoints/step-1 with its marker,
`best`), so `resolve_target` and the server read them exactly as they read a trained run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vray.spec import validate_spec
from vray.storage.checkpoint import CheckpointWriter
from vray.storage.rundir import RunDir

FAMILY_ARCHITECTURE = {"qwen2_5_vl": ("qwen2.5vl", "3B"), "qwen3_vl": ("qwen3vl", "2B"), "qwen3_5": ("qwen3.5", "0.8B")}


def write_adapter_run(output: str | Path, name: str, family: str = "qwen2_5_vl", seed: int = 0,
                      task: str = "vqa", spread: float = 0.2, **spec: Any) -> RunDir:
    """`<output>/<name>`: a run of tiny:<family> whose only checkpoint is a LoRA adapter with random weights."""
    from vray.models.loader import apply_lora, load_model, load_processor, resolve_source

    arch_name, size = FAMILY_ARCHITECTURE[family]
    resolved = validate_spec({
        "architecture": {"name": arch_name, "size": size}, "model": {"source": f"tiny:{family}"}, "task": task,
        "name": name, "output": str(output), "compute": {"precisionType": "Float32"},
        "evaluation": {"maxNewTokens": 8, "temperature": 0, "repetitionPenalty": 1.0}, **spec,
    })
    run = RunDir.of(Path(output) / name)
    run.root.mkdir(parents=True, exist_ok=True)
    run.write_text("spec.yaml", resolved.to_yaml())
    source = resolve_source(f"tiny:{family}")
    torch.manual_seed(seed)
    model = apply_lora(load_model(source, resolved.arch, "Float32"), resolved.arch, resolved.lora)
    with torch.no_grad():  # lora_B starts at zero (a no-op adapter): give it weights of its own
        for pname, param in model.named_parameters():
            if "lora_B" in pname:
                param.normal_(0.0, spread)
    processor = load_processor(source)

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    writer = CheckpointWriter(run)
    writer.write("checkpoints/step-1", save, {"step": 1, "base_model": f"tiny:{family}", "task": task, "metrics": {}})
    writer.wait()
    run.point_best_at("checkpoints/step-1")
    return run
