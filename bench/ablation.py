"""Every optimization switch on against off, in one process on one GPU, one switch at a time.

  python -m bench.ablation --out results/raw/ablation.json [--profile results/raw/profile.txt]

One engine with the shipped config.yaml (full model shape, random weights) stays loaded; each row
flips one switch the way the engine sets it, times `--repeats` images after one untimed image
(which pays any recompile), and flips it back. The default is timed again at the end to show the
drift between rows. Rows that rewrite the weights run in the order that lets them: projection
fusion starts off and is applied second; FP8 comes last, with its deviation from the bf16 images
of the same seeds. The memory modes move weights off the GPU, so they get their own processes
(`bench.engine --set optimizations.memory_mode=...`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from bench.common import (PROMPT, Timer, config_with, deviation, stamp, summarize,
                          write_json)
from zimage_backend import float8, fusion
from zimage_backend.encoding import encode_image
from zimage_backend.engine import Engine, kernel_times_ms
from zimage_backend.request import GenerationRequest
from zimage_backend.settings import load_settings


class Bench:
    def __init__(self, engine: Engine, size: int, steps: int, repeats: int,
                 on_row: Callable[[], None]):
        self.engine, self.size, self.steps, self.repeats = engine, size, steps, repeats
        self.rows: list[dict] = []
        self.on_row = on_row  # saves what is measured so far: a run cut short keeps its rows

    def image(self, seed: int) -> tuple[np.ndarray, dict[str, float]]:
        request = GenerationRequest(prompt=PROMPT, height=self.size, width=self.size,
                                    num_inference_steps=self.steps, guidance_scale=0.0,
                                    seed=seed, output_format="png")
        result = self.engine.run([request])
        started = time.perf_counter()
        encode_image(result.pixels[0], "png", self.engine.settings.encoding)
        stages = {**result.timings_ms, "image_encode": (time.perf_counter() - started) * 1000}
        return result.pixels[0], stages

    def measure_batch(self, size: int, batch: int) -> None:
        """Images per second of one pipeline call of `batch` prompts (dynamic batching)
        against one prompt per call, images encoded."""
        requests = [GenerationRequest(prompt=f"{PROMPT}, variation {i}", height=size,
                                      width=size, num_inference_steps=self.steps,
                                      guidance_scale=0.0, seed=i, output_format="png")
                    for i in range(batch)]

        def call() -> None:
            result = self.engine.run(requests)
            for pixels in result.pixels:
                encode_image(pixels, "png", self.engine.settings.encoding)

        call()
        times = []
        for _ in range(self.repeats):
            with Timer() as t:
                call()
            times.append(t.seconds)
        row = {"switch": "batching", "setting": f"{size}x{size}, {batch} per call",
               **summarize(times), "images_per_s": round(batch / statistics.median(times), 3)}
        self.rows.append(row)
        self.on_row()
        print(f"batching {size}x{size} x{batch}: {row['images_per_s']} images/s "
              f"(call {row['median_s']:.3f} s)", flush=True)

    def measure(self, switch: str, setting: str, note: str = "") -> list[np.ndarray]:
        cuda = self.engine.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with Timer() as first:
            self.image(0)
        times, stages, images = [], [], []
        for seed in range(1, self.repeats + 1):
            with Timer() as t:
                pixels, timing = self.image(seed)
            times.append(t.seconds)
            stages.append(timing)
            images.append(pixels)
        row = {"switch": switch, "setting": setting, "note": note,
               "first_s": round(first.seconds, 2), **summarize(times),
               "stage_ms": {k: round(statistics.median(s[k] for s in stages), 1)
                            for k in stages[0]},
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
        self.rows.append(row)
        self.on_row()
        print(f"{switch:18} {setting:24} median {row['median_s']:.3f} s  first "
              f"{row['first_s']:6.2f} s  {row['stage_ms']}", flush=True)
        return images


def _settings_flip(engine: Engine, section: str, **changes):
    @contextlib.contextmanager
    def flip() -> Iterator[None]:
        saved = engine.settings
        engine.settings = dataclasses.replace(saved, **{section: dataclasses.replace(
            getattr(saved, section), **changes)})
        try:
            yield
        finally:
            engine.settings = saved
    return flip


def _flags_flip(*flags: tuple[object, str, object]):
    @contextlib.contextmanager
    def flip() -> Iterator[None]:
        saved = [(target, attr, getattr(target, attr)) for target, attr, _ in flags]
        for target, attr, value in flags:
            setattr(target, attr, value)
        try:
            yield
        finally:
            for target, attr, value in saved:
                setattr(target, attr, value)
    return flip


def _eager(*models: torch.nn.Module):
    """Runs the compiled submodules of `models` uncompiled (nn.Module.compile keeps the
    compiled callable beside the module's own)."""
    @contextlib.contextmanager
    def flip() -> Iterator[None]:
        saved = {m: m._compiled_call_impl for model in models for m in model.modules()
                 if getattr(m, "_compiled_call_impl", None) is not None}
        for module in saved:
            module._compiled_call_impl = None
        try:
            yield
        finally:
            for module, impl in saved.items():
                module._compiled_call_impl = impl
    return flip


def _fresh_compile(flip):
    """For a switch that changes what compiled code assumed without failing a guard (the
    VAE's memory format): drop the compiled code before and after."""
    @contextlib.contextmanager
    def wrapped() -> Iterator[None]:
        torch._dynamo.reset()
        try:
            with flip():
                yield
        finally:
            torch._dynamo.reset()
    return wrapped


def _pipe_flip(on: Callable[[], None], off: Callable[[], None]):
    @contextlib.contextmanager
    def flip() -> Iterator[None]:
        on()
        try:
            yield
        finally:
            off()
    return flip


def _attention(engine: Engine, backend: str):
    transformer = engine.pipe.transformer
    return _pipe_flip(lambda: transformer.set_attention_backend(backend),
                      lambda: transformer.set_attention_backend(engine.attention_backend))


def _qk_kernel_off(transformer: torch.nn.Module):
    processors = [attn.processor for attn in fusion.fused_attentions(transformer)]
    kernels = [p.qk_kernel for p in processors]

    def off() -> None:
        for p in processors:
            p.qk_kernel = None

    def on() -> None:
        for p, kernel in zip(processors, kernels):
            p.qk_kernel = kernel
    return _pipe_flip(off, on)


def profile(bench: Bench, path: Path, top_kernels: int = 0) -> dict:
    """Kernel time by kind for one image, how busy the GPU was over the image, and the
    `top_kernels` kernels that took longest."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with Timer() as wall:
            bench.image(1)
    kinds = {"gemm": ("gemm", "cutlass", "sm90_xmma", "nvjet", "matmul", "_scaled_mm"),
             "attention": ("flash", "fmha", "cudnn", "attention", "sdpa"),
             "convolution": ("conv", "implicit", "winograd"),
             "triton (fused elementwise)": ("triton_",)}
    totals = {k: 0.0 for k in kinds} | {"other": 0.0}
    kernels = kernel_times_ms(prof)
    for name, ms in kernels:
        kind = next((k for k, needles in kinds.items()
                     if any(n in name.lower() for n in needles)), "other")
        totals[kind] += ms
    busy = sum(totals.values())
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    summary = {k: round(v, 1) for k, v in totals.items()} | {
        "kernels_ms": round(busy, 1), "wall_ms": round(wall.seconds * 1000, 1)}
    print("profile (ms):", summary, flush=True)
    if top_kernels and kernels:
        summary["top_kernels_ms"] = {name[:120]: round(ms, 1)
                                     for name, ms in kernels[:top_kernels]}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--load-format", default="dummy", help="tiny: a CPU dry run of the script")
    args = parser.parse_args()
    device = torch.device("cuda", 0) if args.load_format == "dummy" else torch.device("cpu")

    # One image per call and a one-step warmup: the rows time batch 1 and each pays its own
    # recompile in its untimed first image.
    overrides = {"model.load_format": args.load_format, "limits.max_images_per_call": 1,
                 "optimizations.warmup.num_inference_steps": 1,
                 "optimizations.fuse_projections": False, "optimizations.warmup.enabled": False}
    settings = load_settings(config_with(overrides))
    started = time.perf_counter()
    engine = Engine(settings, device)
    load_s = time.perf_counter() - started
    extra: dict = {}

    def save() -> None:
        write_json(args.out, {
            "system": "zimage engine in-process, one switch flipped per row", "size": args.size,
            "steps": args.steps, "repeats": args.repeats, "load_s": round(load_s, 1),
            "optimizations": engine.report.as_dict(), "rows": bench.rows, **extra, **stamp()})

    bench = Bench(engine, args.size, args.steps, args.repeats, save)
    bench.measure("warmup", "off", "first image compiles (unfused graph)")
    bench.measure("fuse_projections", "off")

    fusion.fuse_transformer(engine.pipe.transformer)
    # The engine skipped the kernel at start (it needs the fused blocks); the default has it.
    if settings.optimizations.qk_norm_rope and engine.device.type == "cuda":
        why = fusion.attach_qk_norm_rope(engine.pipe.transformer, engine.device)
        engine.report.add("qk_norm_rope", "applied" if why is None else "fallback", why or "")
    engine.settings = dataclasses.replace(engine.settings, optimizations=dataclasses.replace(
        engine.settings.optimizations, fuse_projections=True,
        warmup=dataclasses.replace(engine.settings.optimizations.warmup, enabled=True)))
    warmup_s = engine._warmup()
    reference = bench.measure("default", "shipped config.yaml",
                              f"warmup before ready took {warmup_s:.1f} s")
    if args.profile:
        extra["profile_ms"] = profile(bench, args.profile)

    opts = settings.optimizations
    vae = engine.pipe.vae
    flips = [
        ("torch_compile", "off", _eager(engine.pipe.transformer, vae, engine.pipe.text_encoder)),
        ("torch_compile", "text_encoder not compiled", _eager(engine.pipe.text_encoder)),
        ("tf32", "off", _flags_flip((torch.backends.cuda.matmul, "allow_tf32", False),
                                    (torch.backends.cudnn, "allow_tf32", False))),
        ("cudnn_benchmark", "off", _flags_flip((torch.backends.cudnn, "benchmark", False))),
        ("channels_last", "on (VAE)", _fresh_compile(_pipe_flip(
            lambda: vae.to(memory_format=torch.channels_last),
            lambda: vae.to(memory_format=torch.contiguous_format)))),
        ("vae_tiling", "off" if opts.vae_tiling else "on",
         _pipe_flip(vae.disable_tiling, vae.enable_tiling) if opts.vae_tiling else
         _pipe_flip(vae.enable_tiling, vae.disable_tiling)),
        ("vae_slicing", "on", _pipe_flip(vae.enable_slicing, vae.disable_slicing)),
        ("qk_norm_rope", "off (torch.compile's kernels)",
         _qk_kernel_off(engine.pipe.transformer)),
        ("attention_backend", "_native_flash", _attention(engine, "_native_flash")),
        ("attention_backend", "native (SDPA picks)", _attention(engine, "native")),
        ("inference_mode", "off (no_grad)",
         _settings_flip(engine, "optimizations", inference_mode=False)),
        ("prompt_padding", "max_length (512)",
         _settings_flip(engine, "optimizations", prompt_padding="max_length")),
        ("png_threads", "1", _settings_flip(engine, "encoding", png_threads=1)),
    ]
    for switch, setting, flip in flips:
        try:
            with flip():
                bench.measure(switch, setting)
        except Exception as exc:  # noqa: BLE001 - a row that cannot run says why and the rest go on
            bench.rows.append({"switch": switch, "setting": setting, "error": repr(exc)[:300]})
            print(f"{switch:18} {setting:24} failed: {exc!r}"[:300], flush=True)
    bench.measure("default", "shipped config.yaml (again: drift)")
    for size in (512, 1024):
        for batch in (1, 4):
            bench.measure_batch(size, batch)

    if float8.supported(engine.device) is None:
        transformer, keep = engine.pipe.transformer, settings.optimizations.fp8_keep_bf16
        selection = float8.select(transformer, keep, "optimizations.fp8_keep_bf16")
        float8.quantize(transformer, selection.fp8)
        fp8_images = bench.measure("fp8", "on", selection.describe())
        extra["fp8_deviation"] = deviation(fp8_images, reference)
        print("fp8 deviation from bf16, same seeds:", extra["fp8_deviation"], flush=True)
        if args.profile:
            extra["fp8_profile_ms"] = profile(bench, args.profile.with_suffix(".fp8.txt"))
        save()


if __name__ == "__main__":
    main()
