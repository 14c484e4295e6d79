#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.py installs on a GPU machine lent for checks, which may have torch and
# transformers but not what else vray needs, and no network. They are built or downloaded here, for CPython 3.12 on
# manylinux x86_64, into benchmarks/wheels/ (ignored by git; carry it to the machine). Everything that travels to
# it, the working tree included, must stay under 64 MiB: the folder's size is printed at the end.
#
#   benchmarks/gpu_wheels.sh            # about 14 MiB, without bitsandbytes: the QLoRA part is then skipped
#   benchmarks/gpu_wheels.sh --qlora    # with bitsandbytes (41 MiB more): about 55 MiB
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=benchmarks/wheels
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --platform manylinux2014_x86_64
        --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64)
# The versions vray is tested with here; pydantic-core comes with the pydantic it matches.
DEEPSPEED=0.19.8
BITSANDBYTES=0.50.2
pins=(pydantic==2.14.4 hjson==3.1.0 peft==0.21.2 accelerate==1.15.0 py-cpuinfo==9.0.0 msgpack==1.2.4 ninja==1.13.2
      einops==0.8.2 psutil==7.2.2 pillow==13.0.0)

rm -rf "$OUT" && mkdir -p "$OUT"
# DeepSpeed publishes only an sdist: build a pure-Python wheel (no compiled ops; its JIT ops are not used here).
DS_BUILD_OPS=0 DS_BUILD_AIO=0 DS_BUILD_GDS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation \
    "deepspeed==$DEEPSPEED" -w "$OUT"
# pydantic with its binary core and small dependencies, resolved for the target interpreter.
"$PY" -m pip download --quiet "${TARGET[@]}" -d "$OUT" pydantic==2.14.4
# The rest without their dependencies (torch, transformers, numpy and the hub client are on the machine;
# Pillow comes with torchvision, which may be missing: the processors then take their PIL path).
"$PY" -m pip download --quiet "${TARGET[@]}" --no-deps -d "$OUT" "${pins[@]:1}"
if [[ "${1:-}" == "--qlora" ]]; then
    "$PY" -m pip download --quiet "${TARGET[@]}" --no-deps -d "$OUT" "bitsandbytes==$BITSANDBYTES"
fi
# typing-extensions ships with torch; the machine's copy is kept.
rm -f "$OUT"/typing_extensions-*.whl

ls -l "$OUT"
tree=$(git ls-files -z | xargs -0 cat | wc -c)
wheels=$(cat "$OUT"/*.whl | wc -c)
echo "wheels: $((wheels / 1024)) KiB in $OUT; tracked tree: $((tree / 1024)) KiB; together $(((wheels + tree) / 1048576)) MiB of 64 MiB"
if (( wheels + tree > 60 * 1048576 )); then
    echo "too large to travel with the working tree (64 MiB, keep room for untracked files)" >&2
    exit 1
fi
