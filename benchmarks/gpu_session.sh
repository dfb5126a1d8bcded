#!/usr/bin/env bash
# Every GPU check of this project in one device call, for a session that is lent a GPU (15 minutes of device time
# in all, 10 a call). Nothing is downloaded: the package is put on PYTHONPATH as it stands and the image's torch,
# triton, transformers and peft are used. Steps run in order of importance, each under its own time limit, all
# inside one deadline that ends before the call's limit, so what ran always comes back:
#   1. CUDA tests: tests/kernels and tests/test_cuda.py at full size (bf16 included)
#   2. kernel microbenchmark (python -m benchmarks.kernels)
#   3. workloads W1, W2, B560, then SERVE-W1 (python -m benchmarks.run), with the sampler microbenchmark
#      (python -m benchmarks.sampling, seconds) after W1
# Results: $OUT/summary.txt (one line a step) and $OUT/gpu-results.tgz (logs and result JSON/PNG), remade after
# every step. Commit the result files to benchmarks/results/ and the figures to the README.
#
# Device tool:  run(command="SOFTPROMPT_GIT_COMMIT=<hash of HEAD> bash benchmarks/gpu_session.sh", timeout_s=590)
#   (the tree sent there has no .git: the hash, written into the command here, names the commit in every result)
# Here (orchestration only; CUDA steps fail or skip):  PYTHON=.venv/bin/python BUDGET_S=120 bash benchmarks/gpu_session.sh
# ONLY="tests kernels" runs a subset; LIMIT_<STEP>=seconds overrides one step's limit (e.g. LIMIT_W1=200);
# BACKEND=triton runs the workloads on the Triton backend (its decode steps from CUDA graphs; default torch); the
# throughput workloads also time the engine on the other backend in the same run (COMPARE_BACKEND, "" for none).
# The tests run on XDIST=8 pytest-xdist workers where it is installed (the GPU image has it), so the Triton JIT
# compiles in parallel. Slow baselines run once (--repeat-budget), and a step stopped at its limit during HF's
# static-cache compile (the last system) still leaves the partial report of the others.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$ROOT/benchmarks/results/gpu-session}
BUDGET_S=${BUDGET_S:-540}
ONLY=${ONLY:-"tests kernels W1 sampling W2 B560 SERVE-W1"}
BACKEND=${BACKEND:-torch}
if [[ $BACKEND == torch ]]; then other=triton; else other=torch; fi
COMPARE_BACKEND=${COMPARE_BACKEND-$other}
XDIST=${XDIST:-8}
STAGE=$(mktemp -d)
MODELS=$(mktemp -d)  # the random checkpoints, built once: W1, W2 and SERVE-W1 share one
DEADLINE=$((SECONDS + BUDGET_S))
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
: > "$OUT/summary.txt"

# softprompt.engine is engine/ and softprompt.kernels is kernels/ (pyproject's package-dir), without pip
SHIM=$(mktemp -d)
mkdir -p "$SHIM/softprompt"
cp "$ROOT"/engine/_root/*.py "$SHIM/softprompt/"
ln -s "$ROOT/engine" "$SHIM/softprompt/engine"
ln -s "$ROOT/kernels" "$SHIM/softprompt/kernels"
export PYTHONPATH="$SHIM:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

note() { echo "$*" | tee -a "$OUT/summary.txt"; }
pack() { tar czf "$OUT/gpu-results.tgz" -C "$STAGE" . 2>/dev/null; }

# step NAME LIMIT_S COMMAND...: run it for at most LIMIT_S (or what is left before the deadline)
step() {
    local name=$1 limit=$2 var start rc left
    shift 2
    case " $ONLY " in *" $name "*) ;; *) return 0 ;; esac
    var="LIMIT_${name//-/_}"
    limit=${!var:-$limit}
    left=$((DEADLINE - SECONDS))
    if ((left < 20)); then
        note "$name: skipped, out of time"
        return 0
    fi
    ((limit > left)) && limit=$left
    start=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$STAGE/$name.log" 2>&1
    rc=$?
    local how="rc=$rc"
    ((rc == 124 || rc == 130 || rc == 137)) && how="stopped at its ${limit}s limit"
    note "$name: $how, $((SECONDS - start)) s; last line: $(tail -n 1 "$STAGE/$name.log" | cut -c1-200)"
    pack
}

{
    if git rev-parse HEAD >/dev/null 2>&1; then
        echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD -- || echo ' (uncommitted changes)')"
    else
        echo "commit ${SOFTPROMPT_GIT_COMMIT:-unknown} (no .git here: as given by SOFTPROMPT_GIT_COMMIT)"
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
    "$PYTHON" -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| triton', triton.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)" 2>&1
    "$PYTHON" -c "import softprompt, softprompt.engine, softprompt.kernels; print('softprompt imports from', softprompt.__file__)" 2>&1
} | tee "$STAGE/environment.txt" | tee -a "$OUT/summary.txt"

parallel=()
if ((XDIST > 1)) && "$PYTHON" -c "import xdist" 2>/dev/null; then parallel=(-n "$XDIST"); fi
compare=()
[[ -n $COMPARE_BACKEND ]] && compare=(--compare-backend "$COMPARE_BACKEND")
step tests 200 "$PYTHON" -m pytest -q -p no:cacheprovider -rfEs "${parallel[@]}" tests/kernels tests/test_cuda.py
step kernels 100 "$PYTHON" -m benchmarks.kernels --out "$STAGE/kernels.json"
bench=("$PYTHON" -m benchmarks.run --backend "$BACKEND" --workdir "$MODELS" --out "$STAGE")
step W1 240 "${bench[@]}" --workload W1 "${compare[@]}"
step sampling 40 "$PYTHON" -m benchmarks.sampling --device cuda --out "$STAGE/sampling.json"
step W2 200 "${bench[@]}" --workload W2 "${compare[@]}"
step B560 200 "${bench[@]}" --workload B560 "${compare[@]}"
step SERVE-W1 150 "${bench[@]}" --workload SERVE-W1
pack
note "done in $SECONDS s; files: $(cd "$STAGE" && ls | tr '\n' ' ')"
