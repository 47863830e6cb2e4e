#!/usr/bin/env bash
# CUDA benchmarks of cpkp on a machine with one GPU and no internet (issue 8, item 5).
#
# Sets up what it needs from the working tree it lies in: a virtual environment on top of the
# machine's own Python (torch, torchvision, timm, numpy, ... must already be installed there;
# nothing is downloaded) that sees cpkp's sources through a .pth file, so nothing is built or
# installed. Then runs benchmarks/perf.py on CUDA with WideResNet-50-2 at the paper's settings
# (preset paper_rd_wrn50: 256x256, batch 8, prototype grid stride 4) on generated images; the
# torchvision ImageNet weights are used when they are in the torch hub cache, random weights
# otherwise (the tables say which). Meant to finish in under 5 minutes; prints the tables.
#
#   bash benchmarks/gpu.sh [OUT_DIR]      # tables and raw figures go to OUT_DIR
#                                         # (default: $OUT if set, else /tmp/cpkp-perf-gpu)
#   CPKP_GPU_DRY_RUN=1 bash benchmarks/gpu.sh   # the same steps on the CPU with a tiny random
#                                               # network, in seconds: checks the script itself
#
# Environment: PYTHON (default python3), CPKP_GPU_VENV (default /tmp/cpkp-gpu-venv),
# CPKP_GPU_BUDGET (seconds for the whole script, default 290).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-/tmp/cpkp-perf-gpu}}"
PYTHON="${PYTHON:-python3}"
VENV="${CPKP_GPU_VENV:-/tmp/cpkp-gpu-venv}"
BUDGET="${CPKP_GPU_BUDGET:-290}"
DRY_RUN="${CPKP_GPU_DRY_RUN:-0}"
START=$SECONDS

say() { printf '[gpu.sh %3ds] %s\n' "$((SECONDS - START))" "$*" >&2; }
die() { say "error: $*"; exit 1; }

mkdir -p "$OUT_DIR" || die "cannot create the output folder $OUT_DIR"
command -v "$PYTHON" >/dev/null || die "no Python interpreter '$PYTHON' (set PYTHON=...)"

# --- 1. environment --------------------------------------------------------------------------
# A venv made from a venv does not see the first one's packages, so the interpreter's own
# site-packages are listed in a .pth file beside cpkp's sources.
make_env() {
    local parent_sites site
    parent_sites="$("$PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))')"
    if "$PYTHON" -m venv --without-pip --system-site-packages "$VENV" 2>/dev/null; then
        site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        printf '%s\n' "$ROOT/src" "$parent_sites" >"$site/cpkp-worktree.pth"
        PY="$VENV/bin/python"
        say "virtual environment $VENV (packages of $PYTHON, cpkp from $ROOT/src)"
    else
        export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
        PY="$PYTHON"
        say "no venv module in $PYTHON: using it with PYTHONPATH=$ROOT/src"
    fi
}
make_env

"$PY" - "$DRY_RUN" <<'EOF' || die "the environment is incomplete (see above)"
import importlib
import sys

needed = ["torch", "torchvision", "timm", "numpy", "scipy", "PIL", "tifffile", "yaml",
          "safetensors", "tqdm"]
missing = []
for name in needed:
    try:
        importlib.import_module(name)
    except ImportError as err:
        missing.append(f"{name} ({err})")
if missing:
    sys.exit("missing Python packages: " + "; ".join(missing))

import torch

import cpkp

print(f"cpkp {cpkp.__version__} from {cpkp.__file__}", file=sys.stderr)
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}", file=sys.stderr)
if sys.argv[1] != "1" and not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device; for a check of this script on a CPU set CPKP_GPU_DRY_RUN=1")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name()}", file=sys.stderr)
EOF
if [[ "$DRY_RUN" != "1" ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
fi

# --- 2. the benchmarks -----------------------------------------------------------------------
cd "$ROOT"
if [[ "$DRY_RUN" == "1" ]]; then
    # Same preset and steps; a tiny random network, tiny images, one run of each, on the CPU.
    COMMON=(--device cpu --preset paper_rd_wrn50 --backbone random:resnet18 --image-size 64
        --quick --category-images 4 --large-category 8)
    SIZES=(--sizes 32,64)
    MODES=(--modes fp32,bf16)
else
    COMMON=(--device cuda --preset paper_rd_wrn50)
    SIZES=(--sizes 128,256,384,512)
    MODES=(--modes fp32,bf16,compile,bf16+compile)
fi
export PYTHONUNBUFFERED=1

say "main tables: training, inference stages, image size, prototype size"
"$PY" benchmarks/perf.py "${COMMON[@]}" "${SIZES[@]}" --sections train,inference,size,prototype \
    --json "$OUT_DIR/perf-gpu.json" --append "$OUT_DIR/perf-gpu.md" >"$OUT_DIR/perf-gpu.txt" ||
    die "benchmarks/perf.py failed (its messages are above)"

# Compilation can take minutes: this part gets what is left of the budget, and each mode it
# finished is already in the log (stderr) if the budget runs out.
left=$((BUDGET - (SECONDS - START)))
if ((left < 30)); then
    say "skipped bf16 / torch.compile: only ${left}s of the ${BUDGET}s budget left"
else
    say "bf16 autocast and torch.compile (at most ${left}s)"
    if ! timeout --signal=INT --kill-after=10 "$left" "$PY" benchmarks/perf.py "${COMMON[@]}" \
        "${MODES[@]}" --sections modes --json "$OUT_DIR/perf-gpu-modes.json" \
        --append "$OUT_DIR/perf-gpu.md" >"$OUT_DIR/perf-gpu-modes.txt"; then
        say "the bf16 / torch.compile run did not finish within ${left}s; its finished modes are in the log above"
    fi
fi

# --- 3. the tables ---------------------------------------------------------------------------
cat "$OUT_DIR/perf-gpu.txt"
if [[ -s "$OUT_DIR/perf-gpu-modes.txt" ]]; then
    sed -n '/^### /,$p' "$OUT_DIR/perf-gpu-modes.txt"
fi
say "done; tables in $OUT_DIR/perf-gpu.md, raw figures in $OUT_DIR/perf-gpu*.json"
