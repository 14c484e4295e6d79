"""`vray export`: a standalone Hugging Face checkpoint of a run.

A LoRA adapter is folded into its base (into the dequantized 4-bit base for QLoRA, the weights the adapter was
trained on); full fine-tuning's weights are written as they are; the processor goes with them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vray.errors import VrayError
from vray.infer.target import require_loadable, resolve_target


def export_merged(run: str, out: str, dtype: str = "BFloat16") -> Path:
    """A standalone Hugging Face checkpoint of a run: LoRA merged into its base (the dequantized base for QLoRA),
    or the full fine-tuned weights; with the processor."""
    from peft import PeftModel

    from vray.models.loader import DTYPES, load_model, load_processor, resolve_source

    target = resolve_target(run)
    require_loadable(target)
    folder = Path(out)
    if folder.exists() and any(folder.iterdir()):
        raise VrayError(f"--out {out} exists and is not empty; choose a new folder")
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    arch = target.arch
    if target.adapter is None:
        source = target.weights or resolve_source(target.base_source)
        model = load_model(Path(source), arch, dtype)
        processor = load_processor(Path(source))
    else:
        base = resolve_source(target.base_source)
        if target.quantization:
            # QLoRA trained the adapter on 4-bit weights: merge into exactly those, dequantized.
            model = load_model(base, arch, dtype, target.quantization).dequantize()
            model.to(DTYPES[dtype])
        else:
            model = load_model(base, arch, dtype)
        model = PeftModel.from_pretrained(model, target.adapter).merge_and_unload()
        processor = load_processor(Path(target.adapter))
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    (tmp / "vray_export.json").write_text(json.dumps({"run": run, "checkpoint": target.checkpoint, "dtype": dtype,
                                                      "architecture": arch.key, "merged_from": target.adapter}) + "\n")
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
