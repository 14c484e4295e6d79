"""How vray finds the Ray token and what it does with it, without a cluster: Ray's order of sources, the refusals of
a token path Ray would abort on, and what a submitted job's runtime_env may carry."""

from __future__ import annotations

import pytest

from vray import jobs
from vray.cluster import find_ray_token, use_ray_token
from vray.errors import VrayError


@pytest.fixture
def shell(monkeypatch, tmp_path):
    """A user's shell: HOME of its own, nothing about Ray exported."""
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_the_token_is_found_in_rays_order(shell, monkeypatch):
    assert find_ray_token() is None
    (shell / ".ray").mkdir()
    (shell / ".ray" / "auth_token").write_text("from-home\n")
    assert (find_ray_token().value, find_ray_token().source) == ("from-home", str(shell / ".ray" / "auth_token"))
    named = shell / "elsewhere"
    named.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    assert find_ray_token().value == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert find_ray_token().value == "from-env"
    assert find_ray_token().http_headers() == {"Authorization": "Bearer from-env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the user says not to send one
    assert find_ray_token() is None


def test_a_token_path_ray_would_abort_on_is_a_clear_error(shell, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(shell / "missing"))
    with pytest.raises(VrayError, match="RAY_AUTH_TOKEN_PATH=.*missing: cannot read the Ray token"):
        find_ray_token()
    (shell / "empty").write_text("")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(shell / "empty"))
    with pytest.raises(VrayError, match="is empty"):
        find_ray_token()


def test_token_mode_without_a_token_names_the_fix(shell, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(VrayError, match="ray get-auth-token"):
        use_ray_token()


def test_a_jobs_runtime_env_never_carries_the_token_or_this_machines_hub_state(shell, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cret")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    env = jobs.runtime_env(str(shell))["env_vars"]
    assert env["HF_TOKEN"] == "hf_x"
    assert "HF_HUB_OFFLINE" not in env and "s3cret" not in str(env)
    with pytest.raises(VrayError, match="never puts the Ray token there"):
        jobs.runtime_env(str(shell), env_vars={"RAY_AUTH_TOKEN": "s3cret"})
