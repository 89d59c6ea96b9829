#!/usr/bin/env bash
# Runs the benchmarks on a GPU machine without registry access (the `device` machines of this
# project's workplace: Python 3.12, torch with CUDA, numpy 2, no diffusers). Each STEP is one
# part; results land in $OUT (or bench/results/raw).
#   setup     unpack the Triton tarball and wheels carried in .dev/a   (see bench/README.md)
#   baselines diffusers eager and compiled, in-process
#   engine    our engine in-process (stages), then the OOM recovery check
#   ablation  every switch flipped one at a time in one process, a kernel profile, FP8
#   memory    the balanced and memory_constrained modes: peak GPU memory and speed
#   venv      numpy<2 serving venv (wheels carried in .dev/b), perf_analyzer's libraries
#   serve     our Triton server on GPU 0: cold start, latency, perf_analyzer, warm restart
#   serve2    the same on every GPU of the machine (scaling)
set -uo pipefail
Z=${ZIMAGE_GPU_DIR:-/root/zt}
OUT=${OUT:-$PWD/bench/results/raw}
mkdir -p "$OUT" "$Z"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
inproc() { PYTHONPATH="$Z/site:$PWD:$PWD/backend:$PWD/client" python3 "$@"; }
served() { PATH="$Z/venv/bin:$Z/bin:$PATH" LD_LIBRARY_PATH="$Z/lib:${LD_LIBRARY_PATH:-}" \
           PYTHONPATH="$Z/triton:$PWD:$PWD/backend:$PWD/client" "$Z/venv/bin/python3" "$@"; }
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
    setup)
      mkdir -p "$Z/triton" "$Z/wheels"
      tar xzf .dev/a/triton-3.12.tgz -C "$Z/triton"
      cp .dev/a/*.whl "$Z/wheels/"
      python3 -m pip install -q --no-index --no-deps --target "$Z/site" "$Z"/wheels/diffusers-*.whl
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv ;;
    baselines)
      inproc -m bench.baselines --variant eager --out "$OUT/diffusers_eager.json"
      inproc -m bench.baselines --variant compiled --out "$OUT/diffusers_compiled.json" ;;
    engine)
      inproc -m bench.engine --out "$OUT/engine.json"
      inproc -m bench.oom_check --out "$OUT/oom.json" ;;
    ablation)
      inproc -m bench.ablation --out "$OUT/ablation.json" --profile "$OUT/profile.txt" ;;
    memory)
      # TORCH_LOGS counts recompiles: offload moves the weights between calls.
      TORCH_LOGS=recompiles inproc -m bench.engine --set optimizations.memory_mode=balanced \
        --repeats 2 --out "$OUT/memory_balanced.json" 2> "$Z/balanced.log"
      echo "recompile log lines under balanced: $(grep -ci recompil "$Z/balanced.log")"
      grep -i "recompil" "$Z/balanced.log" | head -4 | cut -c1-300
      inproc -m bench.engine --set optimizations.memory_mode=balanced \
        --set optimizations.torch_compile.enabled=false --repeats 2 \
        --out "$OUT/memory_balanced_eager.json"
      inproc -m bench.engine --set optimizations.memory_mode=memory_constrained --repeats 2 \
        --out "$OUT/memory_memory_constrained.json" ;;
    venv)
      cp .dev/b/*.whl "$Z/wheels/"
      bash .dev/b/serving_venv.sh "$Z/venv" "$Z/wheels"
      # The backend stub imports model.py's packages from the venv, not from PYTHONPATH.
      site=$("$Z/venv/bin/python3" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
      printf '%s\n' "$PWD/backend" "$PWD/client" > "$site/zimage_dev.pth"
      mkdir -p "$Z/lib" "$Z/bin" && dpkg -x .dev/b/libb64-0d_*.deb "$Z/deb"
      cp "$Z"/deb/usr/lib/x86_64-linux-gnu/libb64.so.0d* "$Z/lib/"
      ln -sf "$(ls "$Z"/triton/nvidia_pytriton.libs/libcudart*.so.12* | head -1)" "$Z/lib/libcudart.so.12"
      ln -sf "$(find "$Z/venv" -name perf_analyzer -type f | head -1)" "$Z/bin/perf_analyzer"
      served -c "import numpy, tritonclient.grpc, diffusers; print('venv ok', numpy.__version__)"
      LD_LIBRARY_PATH="$Z/lib" "$Z/bin/perf_analyzer" --version 2>&1 | head -2 ;;
    serve)
      served -m bench.server --gpus 0 --concurrency 1,2,4,8 --small-concurrency 1,4 \
        --window-ms 8000 --out "$OUT/server_1gpu.json" ;;
    serve2)
      served -m bench.server --no-restart --concurrency 1,2,4,8 --window-ms 8000 \
        --out "$OUT/server_all_gpus.json" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
