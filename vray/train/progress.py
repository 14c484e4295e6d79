"""What the driver shows of a running or finished run: a progress bar read from metrics.jsonl, and curves.png."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from vray.storage.rundir import RunDir


class ProgressView:
    """Renders step, loss, samples/s and ETA from metrics.jsonl while training runs."""

    def __init__(self, run: RunDir, console: Console):
        self.run, self.console = run, console
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> ProgressView:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        seen = 0
        with Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                      TimeElapsedColumn(), console=self.console, transient=False) as progress:
            task = progress.add_task("train", total=None, info="starting workers...")
            while True:
                stopping = self._stop.is_set()
                records = self.run.read_metrics()
                for rec in records[seen:]:
                    if rec.get("event") == "start":
                        progress.update(task, total=rec["total_steps"], completed=rec.get("resumed_at", 0))
                    elif rec.get("event") == "skipped_samples":
                        names = ", ".join(f"{s['id']} ({s['file']})" for s in rec["samples"][:3])
                        progress.console.print(f"  [yellow]skipped {rec['skipped']} sample(s) that no longer decode "
                                               f"by step {rec['step']}: {names}; see data_report.json[/yellow]")
                    elif "loss" in rec:
                        eta = rec.get("eta_s", 0.0)
                        progress.update(task, completed=rec["step"], info=(
                            f"loss {rec['loss']:.4f}  {rec['samples_per_s']:.1f} samples/s  ETA {int(eta) // 60}:{int(eta) % 60:02d}"))
                    evals = {k: v for k, v in rec.items() if k.startswith("eval/") and k != "eval/samples"}
                    if evals:
                        shown = "  ".join(f"{k[5:]} {v:.4f}" for k, v in evals.items())
                        progress.console.print(f"  eval @ step {rec['step']}: {shown}")
                seen = len(records)
                if stopping:
                    return
                time.sleep(0.5)


def draw_curves(run: RunDir) -> Path | None:
    """curves.png: training loss and evaluation metrics against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = run.read_metrics()
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if not train:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(*zip(*train), label="train loss")
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "o-", label="eval loss")
        for key in sorted({k for r in evals for k in r if k.startswith("eval/") and k not in ("eval/loss", "eval/samples")}):
            axes[1].plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r], "o-", label=key[5:])
    axes[0].set_xlabel("step"), axes[0].set_title("loss"), axes[0].legend()
    axes[1].set_xlabel("step"), axes[1].set_title("held-out metric"), axes[1].set_ylim(0, 1.05)
    if evals:
        axes[1].legend()
    else:
        axes[1].text(0.5, 0.5, "no held-out data", ha="center", va="center", transform=axes[1].transAxes)
    fig.tight_layout()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fig.savefig(Path(tmp) / "curves.png", dpi=100)
        plt.close(fig)
        run.upload(Path(tmp) / "curves.png", "curves.png")
    return run.join("curves.png")
