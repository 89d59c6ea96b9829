#!/usr/bin/env bash
# Runs the benchmarks on a GPU machine without registry access (the `device` machines of this
# project's workplace: Python 3.12, torch with CUDA, numpy 2, no diffusers). Each STEP is one
# part; results land in $OUT (or bench/results/raw).
#   setup     unpack the Triton tarball (.tgz or .txz) and wheels carried in .dev/a
#             (see bench/README.md)
#   baselines diffusers eager and compiled, in-process
#   floor     the card's speed on the transformer's matrix work alone (GEMM, attention)
#   graphs    our engine in-process with and without the text encoder's CUDA graphs
#   smallgraphs the transformer's CUDA graphs in-process (bench/graphs.py): 256, 512, 1024 as
#             served, without graphs, and eager, images compared; memory per graph key
#   qk        our engine in-process with and without the qk_norm_rope kernel
#   engine    our engine in-process (stages), then the OOM recovery check
#   ablation  every switch flipped one at a time in one process, a kernel profile, FP8
#   shapes    static against dynamic compiled shapes, each profiled
#   memory    the balanced and memory_constrained modes: peak GPU memory and speed
#   venv      numpy<2 serving venv (wheels carried in .dev/a or .dev/b), perf_analyzer's
#             libraries when tritonclient was carried
#   qkcheck   the qk_norm_rope kernel: its start-up check, offsets past 2**31, its time
#   attention attention kernels at the served shape, with and without a mask
#   failures  out of memory and a broken device through the server (oom_served.json)
#   gateway   the shipped config served (dummy weights, compiled), zimage-gateway in front,
#             bench.gateway pairing the two paths at 1024x1024 (wheels carried in .dev/c)
#   serve     our Triton server on GPU 0: cold start, latency, perf_analyzer, warm restart
#   serve2    the same on every GPU of the machine (scaling), from the compile cache if any
#   serve1    serve from that cache without the restart, one request profiled
#   servefp8  latency through the server with optimizations.fp8 on (GPU 0), and the
#             deviation of its images from serve's bf16 images of the same seeds
#   quality   FP8 against bf16 in-process on bench/quality.py's prompts and seeds (PSNR, SSIM;
#             dummy weights: says nothing about quality, checks the script and the recipe)
#   lora      LoRA adapters in-process (bench/lora.py): none, one, two, after a switch
#   servelora the same through our Triton server (needs venv): bench/results/<run>/lora.json
#   images    the image modes through our Triton server (needs venv), dummy pipeline and
#             ControlNet, 1024x1024: text-to-image, image-to-image, inpainting, ControlNet
#   round2diffusers, round2bf16, round2fp8: issue 15's one-card run, one call each after
#             `setup venv` (~40 s): diffusers eager and compiled at 1024x1024; the shipped
#             config served at 1024, 512 and 256, cold start and warm restart; the same with
#             optimizations.fp8 on, from its own cold start (bench/README.md, "Round two")
#   round2candidates round2bf16 with the switches still off by default turned on (transformer
#             graphs, static VAE code, text encoder stack); after round2bf16 on one machine
# SERVE_ARGS adds arguments to the serve steps, e.g. "--set optimizations.tf32=false".
set -uo pipefail
Z=${ZIMAGE_GPU_DIR:-/root/zt}
OUT=${OUT:-$PWD/bench/results/raw}
mkdir -p "$OUT" "$Z"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# The second compiled variants, off in the shipped config until measured (README, Performance).
GRAPHS_ON='optimizations.torch_compile.cuda_graphs=[text_encoder, transformer]'
STATIC_ON='optimizations.torch_compile.static_shapes=[vae_decoder]'
WARM_256='optimizations.warmup.sizes=[[1024, 1024], [512, 512], [256, 256]]'
inproc() { PYTHONPATH="$Z/site:$PWD:$PWD/backend:$PWD/client" python3 "$@"; }
served() { PATH="$Z/venv/bin:$Z/bin:$PATH" LD_LIBRARY_PATH="$Z/lib:${LD_LIBRARY_PATH:-}" \
           PYTHONPATH="$Z/triton:$PWD:$PWD/backend:$PWD/client" "$Z/venv/bin/python3" "$@"; }
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
    setup)
      mkdir -p "$Z/triton" "$Z/wheels"
      tar xf .dev/a/triton-3.12.t?z -C "$Z/triton"
      cp .dev/a/*.whl "$Z/wheels/"
      cp .dev/a/*.deb .dev/a/*.sh "$Z/" 2>/dev/null
      python3 -m pip install -q --no-index --no-deps --target "$Z/site" "$Z"/wheels/diffusers-*.whl
      # The dummy format's tokenizer reads dashscope's qwen.tiktoken (carried in .dev/a).
      python3 -m pip install -q --no-index --no-deps --target "$Z/site" "$Z"/wheels/dashscope-*.whl
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
    smallgraphs)
      inproc -m bench.graphs --set "$GRAPHS_ON" --set "$STATIC_ON" --set "$WARM_256" \
        --out "$OUT/graphs_transformer.json" ;;
    qk)
      inproc -m bench.engine --set optimizations.qk_norm_rope=false \
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
      cp .dev/b/*.whl "$Z/wheels/" 2>/dev/null
      cp .dev/b/*.deb .dev/b/*.sh "$Z/" 2>/dev/null
      bash "$Z/serving_venv.sh" "$Z/venv" "$Z/wheels"
      # The backend stub imports model.py's packages from the venv, not from PYTHONPATH.
      site=$("$Z/venv/bin/python3" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
      printf '%s\n' "$PWD/backend" "$PWD/client" > "$site/zimage_dev.pth"
      mkdir -p "$Z/lib" "$Z/bin" && dpkg -x "$Z"/libb64-0d_*.deb "$Z/deb"
      cp "$Z"/deb/usr/lib/x86_64-linux-gnu/libb64.so.0d* "$Z/lib/"
      ln -sf "$(ls "$Z"/triton/nvidia_pytriton.libs/libcudart*.so.12* | head -1)" "$Z/lib/libcudart.so.12"
      ln -sf "$(find "$Z/venv" -name perf_analyzer -type f | head -1)" "$Z/bin/perf_analyzer"
      served -c "import numpy, diffusers; print('venv ok', numpy.__version__)"
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
    qkcheck)
      inproc -m bench.qk_norm_rope_check --out "$OUT/qk_norm_rope_check.json" ;;
    attention)
      inproc -m bench.attention_kernels --out "$OUT/attention_kernels.json" ;;
    failures)
      served -m bench.failure_served --out-dir "$OUT" ;;
    gateway)
      [ -d .dev/c ] && python3 -m pip install -q --no-index --no-deps --target "$Z/gwsite" .dev/c/*.whl
      cfg=$(served -c "from bench.common import config_with; print(config_with({'model.load_format': 'dummy'}))")
      TORCHINDUCTOR_CACHE_DIR="$Z/inductor" served -m zimage_backend.launcher --config "$cfg" \
        --http-port 18000 --grpc-port 18001 --metrics-port 18002 \
        --log-file "$OUT/gateway_server.log" & spid=$!
      gw="$Z/gwsite:$Z/triton:$PWD:$PWD/backend:$PWD/client:$PWD/gateway"
      PYTHONPATH="$gw" ZIMAGE_GATEWAY_API_KEYS=bench-key-0123456789abcdef \
        "$Z/venv/bin/python3" -m zimage_gateway --server grpc://127.0.0.1:18001 --port 18080 \
        > "$OUT/gateway.log" 2>&1 & gpid=$!
      served -c "import time, urllib.request as u
for _ in range(900):
    try:
        u.urlopen('http://127.0.0.1:18000/v2/models/zimage/ready', timeout=2); break
    except Exception: time.sleep(1)"
      PYTHONPATH="$gw" ZIMAGE_GATEWAY_KEY=bench-key-0123456789abcdef \
        "$Z/venv/bin/python3" -m bench.gateway \
        --gateway-url http://127.0.0.1:18080 --grpc-url grpc://127.0.0.1:18001 --size 1024 \
        --steps 8 --repeats 12 --out "$OUT/gateway_1024.json"
      # served runs in a subshell: the launcher is its child, and SIGINT must reach it.
      kill $gpid; pkill -INT -P $spid; wait $spid ;;
    quality)
      inproc -m bench.quality --out "$OUT/quality.json" ;;
    lora)
      inproc -m bench.lora --out "$OUT/lora_engine.json" ;;
    servelora)
      served -m bench.lora --server --compile-cache "$Z/inductor" --out "$OUT/lora.json" ;;
    images)
      served -m bench.image_modes --compile-cache "$Z/inductor" --out "$OUT/image_modes.json" ;;
    round2diffusers)
      # ~110 s: per variant ~20 s to build the dummy pipeline, then 1 + 10 images: eager 1.4 s
      # each, compiled 0.9 s after a first image of ~40 s (2026-11-26 runs' JSON times).
      inproc -m bench.baselines --variant eager --repeats 10 --out "$OUT/diffusers_eager.json"
      inproc -m bench.baselines --variant compiled --repeats 10 \
        --out "$OUT/diffusers_compiled.json" ;;
    round2bf16)
      # ~270 s: cold start ~200 s (issue 15), 1 + 10 images at 1024 (0.85 s), 1 + 20 at 512
      # and 256 (0.24 and 0.17 s), warm restart ~40 s. Its 1024 images are round2fp8's reference.
      rm -rf "$Z/inductor_bf16" "$Z/round2_bf16_images.npz"
      served -m bench.server --gpus 0 --sizes 1024,512,256 --repeats 10,20,20 --concurrency "" \
        --compile-cache "$Z/inductor_bf16" --save-images "$Z/round2_bf16_images.npz" \
        ${SERVE_ARGS:-} --out "$OUT/round2_bf16.json" ;;
    round2fp8)
      # ~240 s: its own cold start (FP8 compiles other kernels; ~200 s), the same requests,
      # no restart. Needs round2bf16's images from the same machine.
      rm -rf "$Z/inductor_fp8"
      served -m bench.server --gpus 0 --sizes 1024,512,256 --repeats 10,20,20 --concurrency "" \
        --no-restart --set optimizations.fp8=true --compile-cache "$Z/inductor_fp8" \
        --compare-images "$Z/round2_bf16_images.npz" ${SERVE_ARGS:-} \
        --out "$OUT/round2_fp8.json" ;;
    round2candidates)
      # round2bf16 with the switches built for issue 15 but off until measured: transformer
      # graphs (256 warmed), static VAE code, the text encoder as one module. Its own cold
      # start (more compiles: expect longer than round2bf16's) and warm restart; its 1024
      # images against round2bf16's. The pair decides the defaults.
      rm -rf "$Z/inductor_candidates"
      served -m bench.server --gpus 0 --sizes 1024,512,256 --repeats 10,20,20 --concurrency "" \
        --set "$GRAPHS_ON" --set "$STATIC_ON" --set "$WARM_256" \
        --set optimizations.text_encoder_stack=true --compile-cache "$Z/inductor_candidates" \
        --compare-images "$Z/round2_bf16_images.npz" ${SERVE_ARGS:-} \
        --out "$OUT/round2_candidates.json" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
