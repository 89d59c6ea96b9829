"""Applies the optimization switches of config.yaml to a loaded pipeline, and says what happened.

Every switch ends in the report as applied, skipped (off, or needs CUDA on a CPU instance) or
fallen back (tried and failed), with the reason, so the startup log shows what really runs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch

from . import float8, fusion
from .settings import Optimizations

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Outcome:
    switch: str
    status: str  # applied | off | skipped | fallback
    detail: str = ""


@dataclasses.dataclass
class Report:
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)

    def add(self, switch: str, status: str, detail: str = "") -> None:
        self.outcomes.append(Outcome(switch, status, detail))
        log.info("optimization %-18s %-8s %s", switch, status, detail)

    def status(self, switch: str) -> str:
        return next(o.status for o in reversed(self.outcomes) if o.switch == switch)

    def as_dict(self) -> dict[str, dict[str, str]]:
        return {o.switch: {"status": o.status, "detail": o.detail} for o in self.outcomes}


def _cuda_switch(report: Report, name: str, enabled: bool, cuda: bool, apply: Callable[[], str]):
    if not enabled:
        report.add(name, "off")
    elif not cuda:
        report.add(name, "skipped", "needs CUDA; this instance runs on the CPU")
    else:
        report.add(name, "applied", apply())


def apply_before_placement(pipe, opts: Optimizations, device: torch.device, report: Report) -> bool:
    """Switches that decide where the weights live. Returns whether the caller should still move
    the whole pipeline to `device` (not when CPU offload manages placement itself)."""
    mode = opts.memory_mode
    if mode == "performance":
        report.add("memory_mode", "applied", "performance: every weight on the GPU")
        return True
    if device.type != "cuda":
        report.add("memory_mode", "skipped", "needs CUDA; this instance runs on the CPU")
        return True
    gpu = device.index or 0
    if mode == "balanced":
        from diffusers.hooks import apply_group_offloading

        # The text encoder (8 GB of the 20) runs once per request, so it streams in: one layer
        # at a time from pinned host memory on a copy stream that fetches the next layer while
        # one runs. diffusers' model offload, tried first, copied every model out and back in
        # per request: 16 s per image on an H200.
        apply_group_offloading(pipe.text_encoder, onload_device=device,
                               offload_type="block_level", num_blocks_per_group=1,
                               use_stream=True)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module) and component is not pipe.text_encoder:
                component.to(device)
        detail = ("text encoder streamed layer by layer from pinned host memory; transformer "
                  "and VAE on the GPU")
    else:
        pipe.enable_sequential_cpu_offload(gpu_id=gpu)
        detail = "sequential CPU offload: weights stream to the GPU layer by layer"
    report.add("memory_mode", "applied", f"{mode}: {detail} (cuda:{gpu})")
    return False


def apply_to_transformer(pipe, opts: Optimizations, device: torch.device, report: Report) -> None:
    """Rewrites of the transformer's blocks; before compile, which then traces the new code."""
    if opts.fuse_projections:
        count = fusion.fuse_transformer(pipe.transformer)
        report.add("fuse_projections", "applied", f"{count} blocks: qkv and w1/w3 fused")
    else:
        report.add("fuse_projections", "off")
    apply_qk_norm_rope_kernel(pipe, opts, device, report)
    if not opts.fp8:
        report.add("fp8", "off")
    elif (why := float8.supported(device)) is not None:
        report.add("fp8", "skipped", why)
    elif opts.memory_mode != "performance":
        report.add("fp8", "skipped", "needs memory_mode performance (offload moves the weights)")
    else:
        count = float8.quantize_transformer(pipe.transformer)
        report.add("fp8", "applied", f"{count} linear layers: float8 e4m3, per-row scales")


def apply_qk_norm_rope_kernel(pipe, opts: Optimizations, device: torch.device,
                              report: Report) -> None:
    """After projection fusion: the kernel replaces code in the fused blocks."""
    if not opts.qk_norm_rope_kernel:
        report.add("qk_norm_rope_kernel", "off")
    elif (why := fusion.use_qk_norm_rope_kernel(pipe.transformer, device)) is not None:
        report.add("qk_norm_rope_kernel", "skipped", why)
    else:
        report.add("qk_norm_rope_kernel", "applied", "q/k RMS norms and RoPE in one Triton "
                   "kernel per attention")


def apply_after_placement(pipe, opts: Optimizations, device: torch.device, report: Report) -> None:
    cuda = device.type == "cuda"

    def cudnn_benchmark() -> str:
        torch.backends.cudnn.benchmark = True
        return "cuDNN picks the fastest convolution per shape (VAE)"

    def tf32() -> str:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return "float32 matmuls and convolutions may use TF32"

    _cuda_switch(report, "cudnn_benchmark", opts.cudnn_benchmark, cuda, cudnn_benchmark)
    _cuda_switch(report, "tf32", opts.tf32, cuda, tf32)

    if opts.channels_last:
        pipe.vae.to(memory_format=torch.channels_last)
        report.add("channels_last", "applied", "VAE in channels_last")
    else:
        report.add("channels_last", "off")
    # The memory modes turn on the slicing they need; the switches can add more.
    by_mode = f"memory_mode {opts.memory_mode} turns it on"
    vae_slicing = opts.vae_slicing or opts.memory_mode != "performance"
    for name, enabled, on, implied in (
            ("vae_tiling", opts.vae_tiling, pipe.vae.enable_tiling, False),
            ("vae_slicing", vae_slicing, pipe.vae.enable_slicing, not opts.vae_slicing)):
        if enabled:
            on()
            report.add(name, "applied", by_mode if implied else "")
        else:
            report.add(name, "off")
    if not opts.attention_slicing:
        report.add("attention_slicing", "off")
    elif not any(hasattr(m, "set_attention_slice") for m in pipe.components.values()):
        # diffusers' enable_attention_slicing would silently do nothing here.
        report.add("attention_slicing", "skipped", "no model of this pipeline slices attention; "
                   "its attention kernels never hold the full score matrix anyway")
    else:
        pipe.enable_attention_slicing()
        report.add("attention_slicing", "applied")
    report.add("inference_mode", "applied" if opts.inference_mode else "off",
               "torch.inference_mode" if opts.inference_mode else "torch.no_grad")


def _cudnn_loaded() -> str:
    """Which cuDNN this process loaded. SDPA picks its kernel by it: with the system's older
    cuDNN found first on LD_LIBRARY_PATH, it chose FlashAttention-2 over cuDNN attention
    (216 against 140 ms per 1024x1024 image on an H200)."""
    try:
        return f"cuDNN {torch.backends.cudnn.version()} loaded"
    except RuntimeError as exc:  # torch refuses a cuDNN other than the one it was built with
        return f"cuDNN mismatch: {str(exc).splitlines()[0][:200]}"


def select_attention_backend(pipe, opts: Optimizations, report: Report,
                             smoke_test: Callable[[], None]) -> str:
    """Walks the fallback chain: a backend wins when it can be set and `smoke_test` runs with it.

    The smoke test matters: flash kernels load fine yet refuse the attention mask that captions of
    different lengths in one batch need.
    """
    reasons = []
    for name in opts.attention_backends:
        try:
            pipe.transformer.set_attention_backend(name)
            smoke_test()
        except Exception as exc:  # noqa: BLE001 - any failure moves on to the next backend
            reasons.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        detail = name + (f" (fell back past {'; '.join(reasons)})" if reasons else "")
        if torch.cuda.is_available():
            detail += f"; {_cudnn_loaded()}"
        report.add("attention_backend", "fallback" if reasons else "applied", detail)
        return name
    raise RuntimeError("no attention backend works: " + "; ".join(reasons))


def apply_compile(pipe, opts: Optimizations, device: torch.device,
                  report: Report) -> frozenset[str]:
    """Compiles the modules config.yaml names; returns those that replay CUDA graphs."""
    compile_opts = opts.torch_compile
    if not compile_opts.enabled:
        report.add("torch_compile", "off")
        return frozenset()
    if device.type != "cuda":
        report.add("torch_compile", "skipped", "needs CUDA; this instance runs on the CPU")
        return frozenset()
    if opts.memory_mode == "memory_constrained":
        # Offload hooks on every layer break the compiled graphs at each of them.
        report.add("torch_compile", "skipped", "memory_mode memory_constrained streams weights "
                   "per layer")
        return frozenset()
    # Every block of the transformer (and every text-encoder layer) shares one code object, and
    # each block kind, batch size, caption length and image size adds a compiled variant. Past
    # torch's default limit of 8 the blocks silently run eagerly: measured on an H200, denoising
    # went from 770 to 1340 ms.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    done, graphed = [], set()

    def kwargs_for(module: str) -> dict:
        # A CUDA graph replays a module's kernels in one launch: for a launch-bound module (a
        # short prompt through the text encoder's 36 layers) the CPU stops setting the pace.
        graphs = module in compile_opts.cuda_graphs
        if graphs:
            graphed.add(module)
        return dict(mode="reduce-overhead" if graphs else compile_opts.mode,
                    fullgraph=compile_opts.fullgraph, dynamic=compile_opts.dynamic)

    if not compile_opts.attention_in_graph:
        if fusion.set_eager_attention(pipe.transformer, True):
            done.append("attention outside the graph")
        else:
            done.append("attention in the graph (attention_in_graph false needs "
                        "fuse_projections)")
    for module in compile_opts.modules:
        if module == "transformer":
            # Compiling the repeated block once compiles in seconds what a whole-model compile
            # takes minutes for, at the same speed (diffusers' regional compilation).
            pipe.transformer.compile_repeated_blocks(**kwargs_for(module))
            done.append("transformer (repeated blocks)")
        elif module == "vae_decoder":
            pipe.vae.decoder.compile(**kwargs_for(module))
            done.append("vae_decoder")
        elif module == "text_encoder":
            if opts.memory_mode != "performance":
                # Its layers carry the offload hooks that stream their weights in.
                done.append(f"not text_encoder (memory_mode {opts.memory_mode} streams it)")
                continue
            # Its decoder layers, the same way: the model's own forward builds masks and
            # caches that need not be traced. A short prompt's encode is launch-bound.
            encoder = pipe.text_encoder
            layers = encoder.layers if hasattr(encoder, "layers") else encoder.model.layers
            layer_kwargs = kwargs_for(module)
            for layer in layers:
                layer.compile(**layer_kwargs)
            done.append("text_encoder (decoder layers)")
    graphs = f"; CUDA graphs: {', '.join(sorted(graphed))}" if graphed else ""
    report.add("torch_compile", "applied", f"{', '.join(done)}; mode={compile_opts.mode}{graphs}")
    return frozenset(graphed)
