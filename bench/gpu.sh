#!/usr/bin/env bash
# Runs the benchmarks on a GPU machine without registry access (the `device` machines of this
# project's workplace: Python 3.12, torch with CUDA, numpy 2, no diffusers). Each STEP is one
# part; results land in $OUT (or bench/results/raw).
#   setup     unpack the Triton tarball and wheels carried in .dev/a   (see bench/README.md)
#   baselines diffusers eager and compiled, in-process
#   floor     the card's speed on the transformer's matrix work alone (GEMM, attention)
#   graphs    our engine in-process with and without the text encoder's CUDA graphs
#   qk        our engine in-process with and without the qk_norm_rope kernel
#   engine    our engine in-process (stages), then the OOM recovery check
#   ablation  every switch flipped one at a time in one process, a kernel profile, FP8
#   shapes    static against dynamic compiled shapes, each profiled
#   memory    the balanced and memory_constrained modes: peak GPU memory and speed
#   venv      numpy<2 serving venv (wheels carried in .dev/b), perf_analyzer's libraries
#   serve     our Triton server on GPU 0: cold start, latency, perf_analyzer, warm restart
#   serve2    the same on every GPU of the machine (scaling), from the compile cache if any
#   serve1    serve from that cache without the restart, one request profiled
#   servefp8  latency through the server with optimizations.fp8 on (GPU 0), and the
#             deviation of its images from serve's bf16 images of the same seeds
#   lora      LoRA adapters in-process (bench/lora.py): none, one, two, after a switch
#   servelora the same through our Triton server (needs venv): bench/results/<run>/lora.json
# SERVE_ARGS adds arguments to the serve steps, e.g. "--set optimizations.tf32=false".
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
    floor)
      inproc -m bench.floor --out "$OUT/floor.json" ;;
    graphs)
      inproc -m bench.engine --set 'optimizations.torch_compile.cuda_graphs=[]' \
        --out "$OUT/graphs_off.json"
      inproc -m bench.engine --out "$OUT/graphs_on.json" ;;
    qk)
      inproc -m bench.engine --set optimizations.qk_norm_rope_kernel=false \
        --out "$OUT/qk_off.json"
      inproc -m bench.engine --out "$OUT/qk_on.json" ;;
    engine)
      inproc -m bench.engine --out "$OUT/engine.json"
      inproc -m bench.oom_check --out "$OUT/oom.json" ;;
    ablation)
      inproc -m bench.ablation --out "$OUT/ablation.json" --profile "$OUT/profile.txt" ;;
    memory)
      inproc -m bench.engine --set optimizations.memory_mode=balanced --repeats 3 \
        --out "$OUT/memory_balanced.json"
      inproc -m bench.engine --set optimizations.memory_mode=memory_constrained --repeats 2 \
        --out "$OUT/memory_memory_constrained.json" ;;
    shapes)
      inproc -m bench.shapes --out "$OUT/shapes.json" --profile-dir "$Z/profiles" ;;
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
      # The compile cache it fills ($Z/inductor) makes serve2's start warm.
      rm -rf "$Z/inductor"
      served -m bench.server --gpus 0 --concurrency 1,2,4,8 --small-concurrency 1,4 \
        --window-requests 12 --compile-cache "$Z/inductor" ${SERVE_ARGS:-} \
        --save-images "$Z/bf16_images.npz" --out "$OUT/server_1gpu.json" ;;
    serve1)
      # serve on GPU 0 from serve2's compile cache, one more request profiled: the one-GPU
      # side of the scaling table on the machine that ran serve2.
      served -m bench.server --gpus 0 --no-restart --concurrency 1,2,4,8 \
        --small-concurrency 1,4 --window-requests 12 --compile-cache "$Z/inductor" \
        --profile ${SERVE_ARGS:-} --out "$OUT/server_1gpu.json" ;;
    serve2)
      served -m bench.server --no-restart --concurrency 1,2,4,8 --window-requests 16 \
        --compile-cache "$Z/inductor" ${SERVE_ARGS:-} --out "$OUT/server_all_gpus.json" ;;
    servefp8)
      served -m bench.server --gpus 0 --no-restart --concurrency "" --set optimizations.fp8=true \
        --compare-images "$Z/bf16_images.npz" ${SERVE_ARGS:-} --out "$OUT/server_fp8.json" ;;
    lora)
      inproc -m bench.lora --out "$OUT/lora_engine.json" ;;
    servelora)
      served -m bench.lora --server --compile-cache "$Z/inductor" --out "$OUT/lora.json" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
