"""What serving and evaluation read from a run: checkpoints that hold training state only are passed over for
final/, and asked for by name they say why they cannot be served."""

from __future__ import annotations

import pytest

from vray.errors import VrayError
from vray.infer.target import resolve_target
from vray.storage.checkpoint import CheckpointWriter
from vray.testing.runs import write_adapter_run


def test_a_state_only_checkpoint_is_passed_over_for_final(tmp_path):
    run = write_adapter_run(tmp_path, "full")
    writer = CheckpointWriter(run)

    def state(folder):
        (folder / "training_state.pt").write_bytes(b"state")

    info = {"step": 2, "metrics": {}, "strategy": "fsdp2", "kind": "full", "weights": None}
    writer.write("checkpoints/step-2", state, info)
    run.point_best_at("checkpoints/step-2")
    with pytest.raises(VrayError, match="holds training state only"):
        resolve_target(run.uri)  # neither best nor latest has weights, and there is no final/ yet
    with pytest.raises(VrayError, match="serve, evaluate or export the run directory or its final/"):
        resolve_target(str(run.root / "checkpoints" / "step-2"))

    def adapter(folder):
        for f in (run.root / "checkpoints" / "step-1").iterdir():
            if f.is_file() and f.name != "vray_checkpoint.json":
                (folder / f.name).write_bytes(f.read_bytes())

    writer.write("final", adapter, {"step": 2, "metrics": {}, "weights": "adapter"})
    target = resolve_target(run.uri)
    assert target.checkpoint == "final" and target.adapter is not None
