#!/usr/bin/env bash
# Load-tests the zimage model with perf_analyzer (from tritonclient[all]==2.51.0).
# usage: perf/perf_analyzer.sh [INPUT_JSON] [extra perf_analyzer args...]
#   e.g. perf/perf_analyzer.sh perf/inputs.json -i grpc -u localhost:8001 \
#          --concurrency-range 1:8:2 --measurement-interval 20000
# perf_analyzer links libcudart.so.12 even against a CPU server; the pip package
# nvidia-cuda-runtime-cu12 provides it, and Debian's libb64-0d provides libb64.so.0d.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
inputs=${1:-$here/inputs.json}
shift || true
# perf_analyzer is a binary in the tritonclient[all] wheel: `make setup` puts it in the project's
# .venv, which need not be activated; otherwise any perf_analyzer on PATH.
perf_analyzer=$(dirname "$here")/.venv/bin/perf_analyzer
[ -x "$perf_analyzer" ] || perf_analyzer=$(command -v perf_analyzer) || {
  echo "perf_analyzer not found in $(dirname "$here")/.venv/bin or on PATH; run make setup" >&2
  exit 127
}
# The python beside it is the one whose site-packages hold nvidia-cuda-runtime-cu12.
python=$(dirname "$perf_analyzer")/python3
[ -x "$python" ] || python=python3
cudart=$("$python" -c 'import nvidia.cuda_runtime, os; print(os.path.join(list(nvidia.cuda_runtime.__path__)[0], "lib"))' 2>/dev/null || true)
export LD_LIBRARY_PATH="${cudart:+$cudart:}${LD_LIBRARY_PATH:-}"
# Image generation takes seconds: measure over time windows, not request counts, and allow
# a long stability window so a first slow (compiling) request does not abort the run.
exec "$perf_analyzer" -m zimage --input-data "$inputs" \
  --measurement-mode time_windows --measurement-interval 10000 --stability-percentage 50 \
  --max-trials 5 "$@"
