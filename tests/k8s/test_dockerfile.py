"""cluster/Dockerfile: every version it installs is pinned, and the EFA build is an argument, off by default. (No image
is built here: the checks read the file.)"""

from __future__ import annotations

import re
import shlex

from tests.conftest import REPO

DOCKERFILE = REPO / "cluster" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _installs(commands: str, tool: str) -> list[str]:
    """The package arguments of every `<tool> install` in a shell command line."""
    lexer = shlex.shlex(commands, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    found = []
    for i in range(len(words) - 1):
        if words[i].endswith(tool) and words[i + 1] == "install":
            for w in words[i + 2:]:
                if w in ("&&", "||", ";", "|", ";;", "&"):
                    break
                if not w.startswith("-"):
                    found.append(w)
    return found


def test_every_version_in_the_dockerfile_is_pinned():
    from vray.k8s.render import ray_version

    steps = _instructions()
    (base,) = [args for word, args in steps if word == "FROM"]
    image, _, tag = base.partition(":")
    assert image == "rayproject/ray" and tag.startswith(f"{ray_version()}-"), base  # the Ray the manifests ask for
    runs = " && ".join(args for word, args in steps if word == "RUN")
    for package in _installs(runs, "pip"):
        # the project itself (its dependencies are pyproject.toml's), or an exact version
        assert package == "." or re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[0-9][A-Za-z0-9.+!\-]*", package), package
    for package in _installs(runs, "apt-get") + _installs(runs, "apt"):
        assert re.fullmatch(r"[a-z0-9.+\-]+=[0-9][A-Za-z0-9.+:~\-]*", package), package
    assert "latest" not in runs.lower()
    urls = re.findall(r"https?://[^\s'\"]+", runs)
    assert urls and all(re.search(r"\$\{[A-Z_]+_VERSION\}|[0-9]+\.[0-9]+\.[0-9]+", u) for u in urls), urls


def test_efa_and_aws_ofi_nccl_are_a_build_argument_off_by_default():
    steps = _instructions()
    args = dict(a.partition("=")[::2] for word, a in steps if word == "ARG")
    assert args["EFA"] == "0"
    assert re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", args["EFA_INSTALLER_VERSION"])
    (efa,) = [a for word, a in steps if word == "RUN" and "efa_installer.sh" in a]
    assert efa.startswith('if [ "$EFA" = "1" ]; then') and efa.rstrip().endswith("fi")
    assert "aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" in efa
    assert "--skip-kmod" in efa and "/opt/amazon/ofi-nccl/lib" in efa  # userspace only; NCCL finds the plugin
