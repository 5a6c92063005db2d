#!/usr/bin/env bash
# The GPU checks of the kernels issue in one short call on a machine with an NVIDIA GPU.
#
#   OUT=/tmp/gpu bash scripts/gpu_check.sh            # in the repository root's copy there
#
# What it does, in order of importance, each step under its own time limit and all of them
# inside one overall deadline (BUDGET seconds, default 570), so that a step that runs out still
# leaves every earlier step's log and JSON (packed into $OUT on exit):
#   env        nvidia-smi, torch / triton / nvcc versions
#   build      fastshift._C built in place against THAT machine's torch (python setup.py
#              build_ext --inplace, CUDA required, TORCH_CUDA_ARCH_LIST 9.0 unless set). The
#              package pins torch 2.14.1 for its own installs; the sources also build against
#              torch 2.11.0 + triton 3.6.0, the versions seen on the lent GPU machines
#              (checked on CPU, README "Checks for the GPU made without one").
#   info       python -m fastshift.info (what is built and usable)
#   tests_cuda the CUDA bodies against the reference: pytest -k "cuda and not triton"
#   ops_block  benchmarks/bench_ops.py --kinds block --backends cuda (the 2x cuDNN target)
#   profile    benchmarks/profile_block.py: wall against kernel time and launches per block
#   tests_triton  the Triton kernels compiled for the GPU (TRITON_INTERPRET=0): pytest -k triton
#   search     benchmarks/bench_search.py --scale gpu on a few candidates: the CUDA bodies
#              (sequential, batched) and the batched engine on PyTorch's ops (cuDNN)
#   ops_all    benchmarks/bench_ops.py, every op and block, cuda and triton backends
# A summary table (with the failed tests) is printed last; summary.txt, every JSON and
# gpu_check_logs.tar.gz (every log and JUnit file) are in $OUT.
#
# BASELINE=DIR (optional): a source tree of another commit (e.g. `git archive REV | tar -x -C
# DIR`, carried to the machine), built beside this one (half the cores each; the two builds
# together did not finish within 240 s on an H200 machine when one build took 352 s) and
# timed by the same ops_block, profile and search steps right after this tree's (steps
# *_base), so the A/B runs on one machine.
#
# Environment: OUT (default /tmp/fastshift-gpu-check), PYTHON (default python3), BUDGET,
# FASTSHIFT_KEEP_CXX (set: keep the environment's CC / CXX instead of /usr/bin's),
# DEVICE (default cuda), OPS_SCALE / SEARCH_SCALE (default gpu), SEARCH_CANDIDATES (4),
# SEARCH_KS ("4"), SKIP (space-separated step names to leave out), MAX_JOBS (default nproc),
# PROFILE_ARGS (more profile_block.py arguments; default "--host-top 10": where the host time
# goes, since the small blocks are host-bound; e.g. "--blocks shuffle3:17 --host-top 15").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fastshift-gpu-check}
mkdir -p "$OUT"
# Steps write to a work folder; on exit summary.txt, the JSONs and one archive of every log go
# to $OUT (the device tool brings back at most 8 files).
W=$(mktemp -d)
pack() {
  cp "$W"/summary.txt "$W"/*.json "$OUT"/ 2>/dev/null
  tar czf "$OUT/gpu_check_logs.tar.gz" -C "$W" . 2>/dev/null
}
trap pack EXIT
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-570}
DEVICE=${DEVICE:-cuda}
OPS_SCALE=${OPS_SCALE:-gpu}
SEARCH_SCALE=${SEARCH_SCALE:-gpu}
SEARCH_CANDIDATES=${SEARCH_CANDIDATES:-4}
SEARCH_KS=${SEARCH_KS:-4}
SKIP=" ${SKIP:-} "
PROFILE_ARGS=${PROFILE_ARGS:---host-top 10}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=${TRITON_INTERPRET:-0}  # compiled Triton, not the CPU interpreter
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# The lent GPU machines' image sets CC / CXX to a g++ wrapper (/opt/gcc) that links libstdc++
# statically into shared objects: C++ errors then crash the process (measured 2026-11-26;
# setup.py now refuses such a build). The system compilers link it as a shared library.
if [ -z "${FASTSHIFT_KEEP_CXX:-}" ] && [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++
fi
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
DEADLINE=$(( $(date +%s) + BUDGET ))
: > "$W/summary.txt"

# step NAME LIMIT CMD...: run CMD with its output in $W/NAME.log, for at most LIMIT seconds
# and never past the deadline; one line per step in summary.txt.
step() {
  local name=$1 limit=$2 left rc start
  shift 2
  case "$SKIP" in *" $name "*) echo "$name skipped" | tee -a "$W/summary.txt"; return 0 ;; esac
  left=$(( DEADLINE - $(date +%s) - 5 ))
  if [ "$left" -lt 20 ]; then
    echo "$name not run: deadline reached" | tee -a "$W/summary.txt"
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  start=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$W/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$W/summary.txt"
  tail -n 4 "$W/$name.log"
  return $rc
}

env_report() {
  nvidia-smi || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  "$PY" -c "import triton; print('triton', triton.__version__)" || true
  "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version | tail -n 2 || true
  nproc
}

export PY
export -f env_report
step env 30 bash -c env_report
# on a GPU the CUDA bodies are required: a build without them fails instead of going on
[ "$DEVICE" = cuda ] && export FASTSHIFT_FORCE_CUDA=1
BASE=${BASELINE:-}
if [ -n "$BASE" ]; then
  BASE=$(cd "$BASE" && pwd) || exit 1
  export MAX_JOBS=$(( (MAX_JOBS + 1) / 2 ))
  ( cd "$BASE" && timeout 300 "$PY" setup.py build_ext --inplace > "$W/build_base.log" 2>&1
    echo "build_base rc=$?" >> "$W/summary.txt" ) &
  BASE_BUILD=$!
fi
# The build on a lent H200 machine (16 cores): 352 s when the CPU kernels were one translation
# unit, 210 s split per dtype, 117 s with the CPU 1x1 products split per dtype and
# instruction-set level as well (all measured 2026-11-27; 138 s and 114 s on 2026-11-28, with
# more CPU kernels). The limit leaves room for a slower
# machine; SKIP steps that a call of at most 10 minutes cannot fit.
step build 420 "$PY" setup.py build_ext --inplace || {
  echo "build failed: nothing else can run"; tail -n 40 "$W/build.log"; exit 1; }
if [ -n "$BASE" ]; then
  wait "$BASE_BUILD"
  grep -q "build_base rc=0" "$W/summary.txt" || { tail -n 20 "$W/build_base.log"; BASE=; }
fi
# base STEP LIMIT SCRIPT ARGS...: a benchmark script of the baseline tree, as step STEP_base
base() {
  local name=$1 limit=$2 script=$3
  shift 3
  [ -n "$BASE" ] || return 0
  step "${name}_base" "$limit" env PYTHONPATH="$BASE" "$PY" "$BASE/$script" "$@"
}
step info 60 "$PY" -m fastshift.info

XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
step tests_cuda 150 "$PY" -m pytest -q -rfE -p no:cacheprovider "${XDIST[@]}" \
  tests/test_ops.py tests/test_fused_ops.py tests/test_engine.py -k "cuda and not triton" \
  --junitxml="$W/tests_cuda.xml"
step ops_block 90 "$PY" benchmarks/bench_ops.py --scale "$OPS_SCALE" --device "$DEVICE" \
  --kinds block --backends "$DEVICE" --repeats 10 --out "$W/bench_ops_${OPS_SCALE}_block.json"
base ops_block 90 benchmarks/bench_ops.py --scale "$OPS_SCALE" --device "$DEVICE" \
  --kinds block --backends "$DEVICE" --repeats 10 \
  --out "$W/bench_ops_${OPS_SCALE}_block_base.json"
TRITON_BACKEND=triton
"$PY" -c "import sys; from fastshift import ops; sys.exit(not ops.triton_usable('$DEVICE'))" \
  2>/dev/null || TRITON_BACKEND=
step profile 90 "$PY" benchmarks/profile_block.py --scale "$OPS_SCALE" --device "$DEVICE" \
  --backends reference "$DEVICE" $TRITON_BACKEND --out "$W/profile_block_${OPS_SCALE}.json" \
  $PROFILE_ARGS
# shellcheck disable=SC2086  # PROFILE_ARGS is a list
base profile 90 benchmarks/profile_block.py --scale "$OPS_SCALE" --device "$DEVICE" \
  --backends reference "$DEVICE" --out "$W/profile_block_${OPS_SCALE}_base.json" $PROFILE_ARGS
step tests_triton 150 "$PY" -m pytest -q -rfE -p no:cacheprovider "${XDIST[@]}" \
  tests/test_fused_ops.py -k triton --junitxml="$W/tests_triton.xml"
# shellcheck disable=SC2086  # SEARCH_KS is a list
step search 150 "$PY" benchmarks/bench_search.py --scale "$SEARCH_SCALE" --device "$DEVICE" \
  --candidates "$SEARCH_CANDIDATES" --ks $SEARCH_KS --rounds 1 --backend "$DEVICE" \
  --reference-ops-ks $SEARCH_KS \
  --out "$W/bench_search_${SEARCH_SCALE}.json"
# shellcheck disable=SC2086  # SEARCH_KS is a list
base search 150 benchmarks/bench_search.py --scale "$SEARCH_SCALE" --device "$DEVICE" \
  --candidates "$SEARCH_CANDIDATES" --ks $SEARCH_KS --rounds 1 --backend "$DEVICE" \
  --reference-ops-ks $SEARCH_KS --out "$W/bench_search_${SEARCH_SCALE}_base.json"
step ops_all 150 "$PY" benchmarks/bench_ops.py --scale "$OPS_SCALE" --device "$DEVICE" \
  --repeats 10 --out "$W/bench_ops_${OPS_SCALE}.json"

echo "== summary"
cat "$W/summary.txt"
grep -h -E "^(FAILED|ERROR) " "$W"/tests_*.log 2>/dev/null | cut -c1-160 | head -n 30
"$PY" - "$W" <<'EOF'
import glob, json, os, sys
import xml.etree.ElementTree as ET
out = sys.argv[1]
for f in sorted(glob.glob(os.path.join(out, "tests_*.xml"))):
    s = ET.parse(f).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    print(f"{os.path.basename(f)}: tests {s.get('tests')} failures {s.get('failures')} "
          f"errors {s.get('errors')} skipped {s.get('skipped')}")
for f in sorted(glob.glob(os.path.join(out, "bench_ops_*.json"))):
    d = json.load(open(f))
    for b in d["backends"]:
        s = d["summary"][b]
        print(f"{os.path.basename(f)} [{d['device']}] {b} vs reference: block fwd+bwd mean "
              f"{s['block_fwd_bwd_speedup_mean']:.2f}x, total {s['block_fwd_bwd_speedup_total']:.2f}x,"
              f" fwd mean {s['block_fwd_speedup_mean']:.2f}x")
    if "matmul_floor" in d["summary"]:
        print(f"{os.path.basename(f)} [{d['device']}] ceiling (1x1 convs at peak, rest free): "
              f"{d['summary']['matmul_floor']['block_fwd_bwd_speedup_ceiling_mean']:.2f}x")
for f in sorted(glob.glob(os.path.join(out, "profile_block_*.json"))):
    d = json.load(open(f))
    for block, per in d["blocks"].items():
        print(f"{os.path.basename(f)} {block}: " + "; ".join(
            f"{b} wall {p['wall_ms']:.2f} ms, device {p['device_ms']:.2f} ms, "
            f"{p['launches']:.0f} launches" for b, p in per.items()))
for f in sorted(glob.glob(os.path.join(out, "bench_search_*.json"))):
    d = json.load(open(f))
    for mode, m in d["modes"].items():
        print(f"{os.path.basename(f)} [{d['device']}] {mode}: {m['s_per_candidate']:.3f} s/cand, "
              f"{m['speedup_vs_reference']:.2f}x reference")
EOF
