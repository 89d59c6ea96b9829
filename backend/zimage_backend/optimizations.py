"""Applies the optimization switches of config.yaml to a loaded pipeline, and says what happened.

The order is declared in `STEPS`, not implied by a sequence of calls: module rewrites first (they
replace layers, so they must meet real weights, not the placeholders that offload hooks leave),
then placement, then the switches that only set flags, then attention, then compilation. Each
step has its requirement (why it cannot run here) and its own check on the instance's device,
so every switch ends in the report as applied, off, skipped (its requirement is not met) or
fallback (its check failed), with its own reason; the startup log shows what really runs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from . import adapters, compiled_variants, float8, fusion
from .settings import Optimizations, Settings
from .text_stack import TextStack, decoder_model

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Outcome:
    switch: str
    status: str  # applied | off | skipped | fallback
    detail: str = ""
    seconds: float = 0.0  # what the step took, its check included


@dataclasses.dataclass
class Report:
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)

    def add(self, switch: str, status: str, detail: str = "", seconds: float = 0.0) -> None:
        self.outcomes.append(Outcome(switch, status, detail, round(seconds, 3)))
        # A fallback serves slower code than configured (eager code for a failed compile):
        # an operator must see it.
        log.log(logging.WARNING if status == "fallback" else logging.INFO,
                "optimization %-26s %-8s %s%s", switch, status, detail,
                f" ({seconds:.1f} s)" if seconds >= 0.05 else "")

    def status(self, switch: str) -> str:
        return next(o.status for o in reversed(self.outcomes) if o.switch == switch)

    def as_dict(self) -> dict[str, dict[str, str]]:
        return {o.switch: {"status": o.status, "detail": o.detail} for o in self.outcomes}


class CheckFailed(Exception):
    """A step's check failed on this device: the step is reported `fallback` with this reason,
    and the pipeline is left as it was before the step or with the next choice applied."""


@dataclasses.dataclass
class Context:
    """What the steps work on, and what they leave for the engine."""

    pipe: object
    settings: Settings
    device: torch.device
    report: Report
    # One pipeline run through the engine with what the steps so far left (the modules that
    # replay CUDA graphs, the adapter bank): the checks of compile and of the graphs. Called
    # as run_once(ctx) (the default size, one step) or run_once(ctx, height, width, steps);
    # returns the images.
    run_once: Callable[..., list[np.ndarray]]
    attention_backend: str = "native"
    unmasked_attention_backend: str | None = None
    graphed: frozenset[str] = frozenset()  # compiled modules that replay CUDA graphs
    lora: object = None  # adapters.LoraBank when config.yaml has adapters
    graph_pool: compiled_variants.GraphPool | None = None  # the transformer's CUDA graphs
    text_stack: TextStack | None = None  # the text encoder as the engine runs it
    # Modules' static shapes, still learning: the engine ends their learning when ready.
    static_shapes: list[compiled_variants.StaticShapes] = dataclasses.field(default_factory=list)

    @property
    def opts(self) -> Optimizations:
        return self.settings.optimizations

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def applied(self, switch: str) -> bool:
        return any(o.switch == switch and o.status == "applied" for o in self.report.outcomes)


_NEEDS_CUDA = "needs CUDA; this instance runs on the CPU"


@dataclasses.dataclass(frozen=True)
class Step:
    switch: str
    enabled: Callable[[Optimizations], bool]  # config.yaml's optimizations section
    # Why the step cannot run on this instance, or None.
    requirement: Callable[[Context], str | None]
    # Does the step and says what it did; raises CheckFailed when its check fails.
    apply: Callable[[Context], str]


def _always(ctx: Context) -> str | None:
    return None


def _cuda_only(ctx: Context) -> str | None:
    return None if ctx.cuda else _NEEDS_CUDA


# ----------------------------------------------------------------------- module rewrites


def _fuse(ctx: Context) -> str:
    count = fusion.fuse_transformer(ctx.pipe.transformer)
    return f"{count} blocks: qkv and w1/w3 fused"


def _qk_norm_rope_requirement(ctx: Context) -> str | None:
    if not ctx.cuda:
        return _NEEDS_CUDA
    return None if ctx.applied("fuse_projections") else "needs fuse_projections"


def _qk_norm_rope(ctx: Context) -> str:
    if (why := fusion.attach_qk_norm_rope(ctx.pipe.transformer, ctx.device)) is not None:
        raise CheckFailed(why)
    return "q/k RMS norms and RoPE in one Triton kernel per attention, checked at the model's shape"


def _fp8_requirement_for(module: Callable[[Context], torch.nn.Module],
                         name: str) -> Callable[[Context], str | None]:
    def requirement(ctx: Context) -> str | None:
        if (why := float8.supported(ctx.device)) is not None:
            return why
        if (dtype := module(ctx).dtype) != torch.bfloat16:
            return (f"needs model.dtype bfloat16 (the per-row scaled products write bfloat16); "
                    f"the {name} is {str(dtype).removeprefix('torch.')}")
        if ctx.opts.memory_mode != "performance":
            return "needs memory_mode performance (offload moves the weights)"
        return None
    return requirement


def _fp8_for(module: Callable[[Context], torch.nn.Module], key: str,
             tokens: Callable[[Context], int]) -> Callable[[Context], str]:
    """The FP8 step of one model: its keep-bf16 patterns (optimizations.`key`) checked against
    its module names (an unmatched pattern is a startup error, raised, not a fallback), each
    product shape checked against bf16, then the layers replaced."""
    setting = f"optimizations.{key}"

    def apply(ctx: Context) -> str:
        model, rows = module(ctx), tokens(ctx)
        selection = float8.select(model, getattr(ctx.opts, key), setting)
        if (why := float8.check_products(model, selection.fp8, ctx.device, rows)) is not None:
            raise CheckFailed(why)
        float8.quantize(model, selection.fp8, ctx.device)
        return (f"{selection.describe()} ({setting}); float8 e4m3, per-row scales; products "
                f"checked against bfloat16 at {rows} tokens")
    return apply


def _transformer(ctx: Context) -> torch.nn.Module:
    return ctx.pipe.transformer


def _text_encoder(ctx: Context) -> torch.nn.Module:
    return ctx.pipe.text_encoder


_fp8_requirement = _fp8_requirement_for(_transformer, "transformer")
_fp8 = _fp8_for(_transformer, "fp8_keep_bf16",
                lambda ctx: float8.served_tokens(ctx.settings))
_fp8_text_encoder_requirement = _fp8_requirement_for(_text_encoder, "text encoder")
# A prompt's rows: at most limits.max_prompt_tokens.
_fp8_text_encoder = _fp8_for(_text_encoder, "fp8_text_encoder_keep_bf16",
                             lambda ctx: ctx.settings.limits.max_prompt_tokens)


def _adapters_requirement(ctx: Context) -> str | None:
    return None if ctx.settings.adapters else "no adapters in config.yaml"


def _adapters(ctx: Context) -> str:
    # After the rewrites: the adapters' low-rank products sit beside the fused and quantized
    # products they target, and compile traces them with the rest.
    ctx.lora = adapters.install(ctx.pipe.transformer, ctx.settings, ctx.device,
                                next(ctx.pipe.transformer.parameters()).dtype)
    if ctx.lora is None:
        raise _Skipped("limits.max_adapters_per_request is 0")
    return (f"{len(ctx.settings.adapters)} adapter(s), {len(ctx.lora.layers)} products, "
            f"{ctx.lora.slots} slots of rank {ctx.lora.rank}")


# ------------------------------------------------------------------------------ placement


def _place(ctx: Context) -> str:
    """Where the weights live."""
    pipe, mode, device = ctx.pipe, ctx.opts.memory_mode, ctx.device
    if mode == "performance" or not ctx.cuda:
        pipe.to(device)
        if not ctx.cuda and mode != "performance":
            raise _Skipped(_NEEDS_CUDA)
        return "performance: every weight on the GPU" if ctx.cuda else \
            "performance: every weight on the CPU"
    gpu = device.index or 0
    if mode == "balanced":
        from diffusers.hooks import apply_group_offloading

        # The text encoder (8 GB of the 20) runs once per request, so it streams in: one layer
        # at a time from pinned host memory on a copy stream that fetches the next layer while
        # one runs. diffusers' model offload, tried first, copied every model out and back in
        # per request (bench/results/2026-11-26-h200x2-c/results.md).
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
    return f"{mode}: {detail} (cuda:{gpu})"


class _Skipped(Exception):
    """A step that did what it could but whose switch does not apply here (memory_mode on a
    CPU instance: the weights are still placed)."""


# ---------------------------------------------------------------------------------- flags


def _cudnn_benchmark(ctx: Context) -> str:
    torch.backends.cudnn.benchmark = True
    return "cuDNN picks the fastest convolution per shape (VAE)"


def _tf32(ctx: Context) -> str:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return "float32 matmuls and convolutions may use TF32"


def _channels_last(ctx: Context) -> str:
    ctx.pipe.vae.to(memory_format=torch.channels_last)
    return "VAE in channels_last"


def _vae_tiling(ctx: Context) -> str:
    ctx.pipe.vae.enable_tiling()
    return ""


def _vae_slicing(ctx: Context) -> str:
    ctx.pipe.vae.enable_slicing()
    return "" if ctx.opts.vae_slicing else f"memory_mode {ctx.opts.memory_mode} turns it on"


def _attention_slicing_requirement(ctx: Context) -> str | None:
    if not any(hasattr(m, "set_attention_slice") for m in ctx.pipe.components.values()):
        # diffusers' enable_attention_slicing would silently do nothing here.
        return ("no model of this pipeline slices attention; its attention kernels never hold "
                "the full score matrix anyway")
    return None


def _attention_slicing(ctx: Context) -> str:
    ctx.pipe.enable_attention_slicing()
    return ""


# ------------------------------------------------------------------------------ attention


def _cudnn_loaded() -> str:
    """Which cuDNN this process loaded. SDPA picks its kernel by it: with the system's older
    cuDNN found first on LD_LIBRARY_PATH, it chose FlashAttention-2 over cuDNN attention
    (bench/results/2026-11-26-h100-b/NOTES.md)."""
    try:
        return f"cuDNN {torch.backends.cudnn.version()} loaded"
    except RuntimeError as exc:  # torch refuses a cuDNN other than the one it was built with
        return f"cuDNN mismatch: {str(exc).splitlines()[0][:200]}"


def attention_check(transformer, device: torch.device, backend: str, masked: bool) -> None:
    """One attention call at the model's head shape through `backend`, against the math
    kernel; with `masked`, over two sequences of unequal length (the mask that captions of
    different lengths in one batch need, which flash kernels refuse)."""
    block = transformer.layers[0].attention
    heads = block.heads
    head_dim = block.norm_q.weight.numel() if block.norm_q is not None else \
        transformer.config.dim // heads
    dtype = next(transformer.parameters()).dtype
    generator = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn((2, 48, heads, head_dim), generator=generator, device=device)
               .to(dtype) for _ in range(3))
    mask = None
    if masked:
        mask = torch.ones((2, 1, 1, 48), dtype=torch.bool, device=device)
        mask[1, ..., 40:] = False
    got = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=backend)
    want = dispatch_attention_fn(q.float(), k.float(), v.float(), attn_mask=mask,
                                 backend="_native_math")
    error = ((got.float() - want).norm() / want.norm()).item()
    if not error < 2e-2:
        raise RuntimeError(f"differs from the math kernel by {error:.3g} (relative L2)")


def _choose_backend(ctx: Context, names: tuple[str, ...], masked: bool) -> tuple[str, str]:
    """Sets the first backend of `names` that can be set and passes its check and returns its
    name and why the ones before it were passed over; raises RuntimeError when none passes (the
    instance cannot serve)."""
    reasons = []
    transformer = ctx.pipe.transformer
    for name in names:
        try:
            transformer.set_attention_backend(name)
            attention_check(transformer, ctx.device, name, masked)
        except Exception as exc:  # noqa: BLE001 - any failure moves on to the next backend
            reasons.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        return name, "; ".join(reasons)
    raise RuntimeError("no attention backend passed its check: " + "; ".join(reasons))


def _attention(ctx: Context) -> str:
    ctx.attention_backend, passed_over = _choose_backend(ctx, ctx.opts.attention_backends,
                                                         masked=True)
    detail = ctx.attention_backend + (f"; {_cudnn_loaded()}" if torch.cuda.is_available() else "")
    if passed_over:
        raise CheckFailed(f"{detail} (fell back past {passed_over})")
    return detail


def _unmasked_attention_requirement(ctx: Context) -> str | None:
    return None if fusion.fused_attentions(ctx.pipe.transformer) else "needs fuse_projections"


def _unmasked_attention(ctx: Context) -> str:
    try:
        name, passed_over = _choose_backend(ctx, ctx.opts.unmasked_attention_backends,
                                            masked=False)
    finally:
        # Choosing set every processor's backend: the masked calls' goes back.
        ctx.pipe.transformer.set_attention_backend(ctx.attention_backend)
    for attn in fusion.fused_attentions(ctx.pipe.transformer):
        attn.processor.unmasked_backend = name
    ctx.unmasked_attention_backend = name
    detail = f"{name} for calls without a mask (one prompt, no guidance)"
    if passed_over:
        raise CheckFailed(f"{detail} (fell back past {passed_over})")
    return detail


# ---------------------------------------------------------------------- text encoder stack


def _text_stack_requirement(ctx: Context) -> str | None:
    if ctx.opts.memory_mode != "performance":
        # Streaming fetches the layers in the order the encoder's own forward runs them.
        return f"memory_mode {ctx.opts.memory_mode} streams the text encoder"
    return None


def _text_stack(ctx: Context) -> str:
    """The stack, checked against the encoder's own forward on a padded batch of two and an
    unpadded one before it replaces it."""
    encoder = ctx.pipe.text_encoder
    stack = TextStack(encoder)
    vocab = encoder.config.vocab_size
    ids = (torch.arange(48, device=ctx.device).reshape(2, 24) * 7919 + 11) % vocab
    key_mask = torch.ones_like(ids, dtype=torch.bool)
    key_mask[0, 17:] = False
    worst = 0.0
    with torch.inference_mode():
        for rows, real in ((ids, key_mask), (ids[1:], key_mask[1:])):
            want = encoder(input_ids=rows, attention_mask=real, output_hidden_states=True,
                           use_cache=False).hidden_states[-2]
            got = stack(rows, None if bool(real.all()) else real)
            scale = want[real].float().abs().max().clamp_min(1e-6)
            worst = max(worst, float(((got - want)[real].float().abs().max() / scale)))
    # In float32 on the CPU the two are bit-equal (tests); in bf16 SDPA may pick another
    # kernel for an explicit mask than for its own causal one: rounding, not an error.
    if worst > (1e-5 if encoder.dtype == torch.float32 else 2e-2):
        raise CheckFailed(f"the stack's output differs from the encoder's by {worst:.3g} of "
                          "its largest value; the encoder's own forward serves")
    removed = stack.drop_capturing_hooks(encoder)
    ctx.text_stack = stack
    return (f"{len(stack.layers)} of {len(stack.layers) + 1} layers in one module, within "
            f"{worst:.2g} of the encoder's output; {removed} output-collecting hooks removed")


# -------------------------------------------------------------------------------- compile


def _compile_requirement(ctx: Context) -> str | None:
    if not ctx.cuda:
        return _NEEDS_CUDA
    if ctx.opts.memory_mode == "memory_constrained":
        # Offload hooks on every layer break the compiled graphs at each of them.
        return "memory_mode memory_constrained streams weights per layer"
    return None


def _compiled_modules(ctx: Context) -> list[tuple[str, torch.nn.Module]]:
    pipe, out = ctx.pipe, []
    for module in ctx.opts.torch_compile.modules:
        if module == "transformer":
            out += [(module, block) for block in pipe.transformer.modules()
                    if type(block).__name__ in pipe.transformer._repeated_blocks]
        elif module == "vae_decoder":
            out.append((module, pipe.vae.decoder))
        elif module == "text_encoder" and ctx.text_stack is not None:
            out.append((module, ctx.text_stack))  # one graph for the stack
        elif module == "text_encoder" and ctx.opts.memory_mode == "performance":
            out += [(module, layer) for layer in decoder_model(pipe.text_encoder).layers]
    return out


def _compile(ctx: Context) -> str:
    """Compiles the modules config.yaml names, checked by one run at the first warmup size (the
    shape compiled first gets static code: the one served most)."""
    compile_opts = ctx.opts.torch_compile
    # Every block of the transformer (and every text-encoder layer) shares one code object, and
    # each block kind, batch size, caption length and image size adds a compiled variant. Past
    # torch's default limit of 8 the blocks silently run eagerly (bench/results/
    # 2026-11-26-h200x2-c/results.md).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    done, graphed = [], set()
    if not compile_opts.attention_in_graph:
        if fusion.set_eager_attention(ctx.pipe.transformer, True):
            done.append("attention outside the graph")
        else:
            done.append("attention in the graph (attention_in_graph false needs "
                        "fuse_projections)")
    modules = _compiled_modules(ctx)
    for name, module in modules:
        # A CUDA graph replays a module's kernels in one launch: for a launch-bound module (a
        # short prompt through the text encoder's 36 layers) the CPU stops setting the pace.
        # The transformer's blocks replay graphs for small images only: the step after this.
        graphs = name in compile_opts.cuda_graphs and name != "transformer"
        if graphs:
            graphed.add(name)
        module.compile(mode="reduce-overhead" if graphs else compile_opts.mode,
                       fullgraph=compile_opts.fullgraph, dynamic=compile_opts.dynamic)
    names = list(dict.fromkeys(name for name, _ in modules))
    if "text_encoder" in compile_opts.modules and "text_encoder" not in names:
        done.append(f"not text_encoder (memory_mode {ctx.opts.memory_mode} streams it)")
    ctx.graphed = frozenset(graphed)
    try:
        ctx.run_once(ctx)
    except Exception as exc:  # noqa: BLE001 - compiled code that fails is not served
        for _, module in modules:
            module._compiled_call_impl = None
        fusion.set_eager_attention(ctx.pipe.transformer, False)
        ctx.graphed = frozenset()
        torch._dynamo.reset()
        raise CheckFailed(f"the first compiled run failed, serving eager code: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    graphs = f"; CUDA graphs: {', '.join(sorted(graphed))}" if graphed else ""
    return f"{', '.join(names + done)}; mode={compile_opts.mode}{graphs}"


def _compiled(ctx: Context, module: str) -> str | None:
    if not ctx.applied("torch_compile"):
        return "needs torch_compile applied"
    if module not in ctx.opts.torch_compile.modules:
        return f"needs {module} in optimizations.torch_compile.modules"
    return None


def _with_compiled_code(ctx: Context, module: str) -> list[tuple[str, torch.nn.Module]]:
    found = [(name, m) for name, m in _compiled_modules(ctx)
             if name == module and m._compiled_call_impl is not None]
    if not found:
        raise _Skipped(f"{module} has no compiled code")
    return found


def _graph_check_size(ctx: Context) -> int:
    """The side of the square the check runs at: the largest warmup square the pool serves,
    else the largest square it serves."""
    limit = ctx.opts.torch_compile.graph_max_pixels
    warmed = [h for h, w in ctx.opts.warmup.sizes if h == w and h * w <= limit]
    side = max(warmed, default=math.isqrt(limit) // 16 * 16)
    return max(side, ctx.settings.limits.min_size)


# Replay runs the kernels the compiled code runs; a pixel off by more than rounding is a
# graph that read or wrote the wrong memory.
GRAPH_CHECK_MAX_PIXEL_DIFFERENCE = 2


def _transformer_graphs(ctx: Context) -> str:
    """The transformer's blocks replay CUDA graphs for small images (compiled_variants.GraphPool),
    checked at the check size: three steps without graphs, then with them twice (the first
    records, the second replays every step), the images compared."""
    tc = ctx.opts.torch_compile
    pool = compiled_variants.GraphPool(tc.graph_max_pixels, tc.graph_pool_size, ctx.device)
    blocks = _with_compiled_code(ctx, "transformer")
    plain = [block._compiled_call_impl for _, block in blocks]
    for _, block in blocks:
        replay = torch.compile(block._call_impl, mode="reduce-overhead", fullgraph=tc.fullgraph,
                               dynamic=tc.dynamic)
        compiled_variants.install(block, lambda args, kwargs: pool.active, replay)
    hook = pool.mark_steps(ctx.pipe.transformer)
    side = _graph_check_size(ctx)
    try:
        reference = ctx.run_once(ctx, side, side, 3)
        ctx.graph_pool = pool
        ctx.run_once(ctx, side, side, 3)
        replayed = ctx.run_once(ctx, side, side, 3)
        difference = max(int(np.abs(a.astype(np.int16) - b).max())
                         for a, b in zip(reference, replayed))
        if difference > GRAPH_CHECK_MAX_PIXEL_DIFFERENCE:
            raise CheckFailed(f"at {side}x{side} the replayed image differs from the compiled "
                              f"code's by up to {difference} of 255")
    except Exception as exc:  # noqa: BLE001 - graphs that fail are not served
        for (_, block), call in zip(blocks, plain):
            block._compiled_call_impl = call
        hook.remove()
        ctx.graph_pool = None
        if isinstance(exc, CheckFailed):
            raise
        raise CheckFailed(f"the graph check at {side}x{side} failed, serving the compiled code "
                          f"without graphs: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]}") from None
    return (f"blocks, images of at most {tc.graph_max_pixels} pixels, at most "
            f"{tc.graph_pool_size} keys; checked at {side}x{side}: replay within {difference} "
            f"of 255 of the compiled code; {pool.describe()}")


def _static_shapes(ctx: Context) -> str:
    """Static code for the shapes the warmup gives each module, dynamic for the others."""
    done, tc = [], ctx.opts.torch_compile
    for name in tc.static_shapes:
        for _, module in _with_compiled_code(ctx, name):
            shapes = compiled_variants.StaticShapes()
            static = torch.compile(module._call_impl, mode=tc.mode, fullgraph=tc.fullgraph,
                                   dynamic=False)
            compiled_variants.install(module, shapes.choose, static)
            ctx.static_shapes.append(shapes)
            done.append(name)
    return f"{', '.join(done)}: static code for each shape met before ready"


def _inference_mode(ctx: Context) -> str:
    return "torch.inference_mode"


STEPS: tuple[Step, ...] = (
    # Module rewrites: before placement and offload hooks.
    Step("fuse_projections", lambda o: o.fuse_projections, _always, _fuse),
    Step("qk_norm_rope", lambda o: o.qk_norm_rope, _qk_norm_rope_requirement, _qk_norm_rope),
    Step("fp8", lambda o: o.fp8, _fp8_requirement, _fp8),
    Step("fp8_text_encoder", lambda o: o.fp8_text_encoder, _fp8_text_encoder_requirement,
         _fp8_text_encoder),
    Step("adapters", lambda o: True, _adapters_requirement, _adapters),
    # Placement.
    Step("memory_mode", lambda o: True, _always, _place),
    Step("text_encoder_stack", lambda o: o.text_encoder_stack, _text_stack_requirement,
         _text_stack),
    # Flags.
    Step("cudnn_benchmark", lambda o: o.cudnn_benchmark, _cuda_only, _cudnn_benchmark),
    Step("tf32", lambda o: o.tf32, _cuda_only, _tf32),
    Step("channels_last", lambda o: o.channels_last, _always, _channels_last),
    Step("vae_tiling", lambda o: o.vae_tiling, _always, _vae_tiling),
    # The memory modes turn on the slicing they need.
    Step("vae_slicing", lambda o: o.vae_slicing or o.memory_mode != "performance", _always,
         _vae_slicing),
    Step("attention_slicing", lambda o: o.attention_slicing, _attention_slicing_requirement,
         _attention_slicing),
    Step("inference_mode", lambda o: o.inference_mode, _always, _inference_mode),
    # Attention, checked alone at the model's head shape.
    Step("attention_backend", lambda o: True, _always, _attention),
    Step("unmasked_attention_backend", lambda o: bool(o.unmasked_attention_backends),
         _unmasked_attention_requirement, _unmasked_attention),
    # Compilation, checked by a run at the first warmup size.
    Step("torch_compile", lambda o: o.torch_compile.enabled, _compile_requirement, _compile),
    # Before the graph check: its runs are shapes met before ready.
    Step("static_shapes", lambda o: o.torch_compile.enabled and bool(o.torch_compile.static_shapes),
         lambda ctx: _compiled(ctx, "vae_decoder"), _static_shapes),
    Step("transformer_cuda_graphs", lambda o: o.torch_compile.enabled and
         "transformer" in o.torch_compile.cuda_graphs and o.torch_compile.graph_max_pixels > 0
         and o.torch_compile.graph_pool_size > 0,
         lambda ctx: _compiled(ctx, "transformer"), _transformer_graphs),
)


def optimize(ctx: Context, steps: tuple[Step, ...] = STEPS) -> Context:
    """Runs `steps` in order on `ctx.pipe`; every step adds one outcome to `ctx.report`."""
    for step in steps:
        if not step.enabled(ctx.opts):
            ctx.report.add(step.switch, "off")
        elif (why := step.requirement(ctx)) is not None:
            ctx.report.add(step.switch, "skipped", why)
        else:
            started = time.perf_counter()
            try:
                status, detail = "applied", step.apply(ctx)
            except _Skipped as exc:
                status, detail = "skipped", str(exc)
            except CheckFailed as exc:
                status, detail = "fallback", str(exc)
            ctx.report.add(step.switch, status, detail, time.perf_counter() - started)
    return ctx
