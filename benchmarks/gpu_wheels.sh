#!/usr/bin/env bash
# Download the wheels `make gpu-check` carries to a lent GPU machine into .whl/ (see benchmarks/gpu_check.py).
#
# The list and the pins come from benchmarks/gpu_check.py (CARRIED, `--wheel-pins`): this virtual environment's
# versions, so the GPU runs what the tests run. The GPU machine has Python 3.12 on x86-64 and no package index:
# binary wheels are fetched for that platform, pure-Python ones for any. DeepSpeed is published as an sdist only:
# it is built here into a pure-Python wheel with no compiled ops (DS_BUILD_OPS=0; DeepSpeed JIT-compiles what it
# needs at run time and chooses its accelerator then, not from the build). Fails when the working tree that
# travels plus the wheels would exceed the budget (60 MiB of the device tool's 64).
#
#   bash benchmarks/gpu_wheels.sh            # or: make gpu-wheels
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DEST=${GPU_WHEELS_DIR:-.whl}
BUDGET_MIB=${GPU_WHEELS_BUDGET_MIB:-60}
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

grep -qxF '/.whl/' .gitignore || { echo "gpu_wheels: add /.whl/ to .gitignore first, or the wheels travel twice" >&2; exit 1; }
mapfile -t PINS < <(HF_HUB_OFFLINE=1 "$PYTHON" -m benchmarks.gpu_check --wheel-pins)
BINARY=()
for pin in "${PINS[@]}"; do
    [[ $pin == deepspeed==* ]] && DEEPSPEED=$pin || BINARY+=("$pin")
done

staging=$(mktemp -d "${TMPDIR:-/tmp}/gpu-wheels.XXXXXX")
trap 'rm -rf "$staging"' EXIT
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_args[@]}" -d "$staging" "${BINARY[@]}"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --no-binary deepspeed \
    -w "$staging" "$DEEPSPEED"

# exactly one wheel per pin, nothing else (two versions of one package stop the whole install there)
count=$(find "$staging" -maxdepth 1 -name '*.whl' | wc -l)
if [[ $count -ne ${#PINS[@]} ]]; then
    echo "gpu_wheels: expected ${#PINS[@]} wheels, got $count:" >&2; ls "$staging" >&2; exit 1
fi
rm -rf "$DEST"
mkdir -p "$DEST"
mv "$staging"/*.whl "$DEST"/

# what travels: tracked and untracked-not-ignored files, plus the carried wheels
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
wheel_bytes=$(find "$DEST" -name '*.whl' -exec stat -c %s {} + | awk '{s+=$1} END {print s+0}')
ls -l "$DEST" | awk 'NR > 1 {printf "%10.2f MiB  %s\n", $5 / 1048576, $9}'
awk -v t="$tree_bytes" -v w="$wheel_bytes" -v b="$BUDGET_MIB" 'BEGIN {
    total = (t + w) / 1048576
    printf "working tree %.1f MiB + wheels %.1f MiB = %.1f MiB (budget %d MiB)\n", t / 1048576, w / 1048576, total, b
    exit total > b
}' || { echo "gpu_wheels: over the budget: carry fewer wheels or ignore large files" >&2; exit 1; }
