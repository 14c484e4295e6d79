"""`vray jobs status` of a job whose driver died names the command that resumes it; `vray submit --resume`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vray import jobs
from vray.errors import VrayError

LOGS = "checking rows\nrun directory: s3://bucket/runs/my run\nrun my-run: Qwen2.5-VL 3B LoRA, ddp\nstep 4/24\n"


def _info(status: str, entrypoint: str = "vray train jobs/tiny.yaml", message: str = "") -> SimpleNamespace:
    """What Ray's JobDetails holds that the report reads: status (an enum in Ray), message, entrypoint."""
    return SimpleNamespace(status=f"JobStatus.{status}",
                           message=message, entrypoint=entrypoint)


def test_a_failed_train_job_is_reported_with_its_resume_command():
    message = "Job entrypoint command failed with exit code -9, last available logs: ..."
    status, lines = jobs.status_lines(_info("FAILED", message=message), LOGS, "http://head:8265")
    assert status == "FAILED"
    assert lines[0] == message
    assert "vray submit --resume 's3://bucket/runs/my run' --address http://head:8265" in lines[1]
    assert "vray train --resume 's3://bucket/runs/my run'" in lines[1]
    stopped, lines = jobs.status_lines(_info("STOPPED"), LOGS)
    assert stopped == "STOPPED" and "vray submit --resume 's3://bucket/runs/my run'" in lines[0]


def test_what_has_nothing_to_resume_gets_no_resume_command():
    assert jobs.status_lines(_info("SUCCEEDED"), LOGS) == ("SUCCEEDED", [])
    assert jobs.status_lines(_info("RUNNING"), "") == ("RUNNING", [])
    assert jobs.status_lines(_info("FAILED", entrypoint="python other.py"), LOGS) == ("FAILED", [])
    # died before prepare decided the run directory: nothing to resume from
    _, lines = jobs.status_lines(_info("FAILED"), "checking rows\n")
    assert lines == ["it stopped before its run directory was made: submit it again"]


def test_submit_resume_runs_vray_train_resume_on_the_cluster(tmp_path):
    assert jobs.train_entrypoint(None, str(tmp_path), ["name=x"], resume="s3://b/runs/a b") == \
        "vray train --resume 's3://b/runs/a b' --set name=x"
    with pytest.raises(VrayError, match="--resume RUN_DIR"):
        jobs.train_entrypoint(None, str(tmp_path))
