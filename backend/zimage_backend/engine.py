"""The generation engine: one optimized ZImagePipeline on one device, run in stages.

The pipeline runs as three timed stages (text encode, denoise, VAE decode) instead of one
`pipe(...)` call, so every response can say where its time went, and a cancelled batch stops
between denoising steps instead of after the decode. The image modes (issue 14) run diffusers'
own pipelines of those tasks, built from the same optimized components; their VAE encoding and
control branch are timed as stages of their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from . import compiled_variants, controlnets, optimizations, random_models
from .request import (CONTROL_MODES, CONTROLNET, CONTROLNET_INPAINT, IMAGE_TO_IMAGE, INPAINT,
                      STRENGTH_MODES, TEXT_TO_IMAGE, GenerationRequest)
from .settings import Settings
from .stage_timing import StageTimer, time_module

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# N: the Nth pipeline call after the model is ready runs under torch.profiler and its kernel
# summary goes to the log. It shows what the GPU did inside the served process, which the
# in-process benchmarks cannot.
PROFILE_ENV = "ZIMAGE_PROFILE_CALL"
# N: the Nth pipeline call after ready breaks the device the way a kernel bug does (a real
# device-side assert on CUDA; on the CPU, which has no such state, the error CUDA reports). For
# testing what a broken GPU looks like from outside; never set in production.
FAULT_ENV = "ZIMAGE_FAULT_CALL"


def kernel_times_ms(prof) -> list[tuple[str, float]]:
    """(kernel name, GPU ms) of a finished torch.profiler run, longest first."""
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    return sorted(((e.key, e.self_device_time_total / 1000) for e in kernels),
                  key=lambda kernel: kernel[1], reverse=True)


class GenerationCancelled(RuntimeError):
    """Every request of the running batch was cancelled; the batch stopped between steps."""


@dataclasses.dataclass
class BatchResult:
    pixels: list[np.ndarray]  # one HxWx3 uint8 image per request, in request order
    timings_ms: dict[str, float]
    cuda_graphs: bool = False  # the transformer's blocks replayed CUDA graphs


def resolve_device(kind: str, device_id: int | str | None) -> torch.device:
    """Maps Triton's instance kind and device id to the torch device the instance owns."""
    if kind.upper() == "GPU":
        return torch.device("cuda", int(device_id or 0))
    return torch.device("cpu")


def load_pipeline(settings: Settings, device: torch.device, dtype: torch.dtype):
    from diffusers import ZImagePipeline

    model = settings.model
    if model.load_format == "dummy":
        return random_models.build_dummy_pipeline(device, dtype, model.seed_for_random_weights)
    if model.load_format == "tiny":
        source, revision = str(random_models.ensure_tiny_pipeline(
            model.demo_dir, model.seed_for_random_weights)), None
    else:
        source, revision = model.source, model.revision
    # As the dummy format builds its models: a compile cache one wrote serves the other.
    return random_models.freeze_weights(
        ZImagePipeline.from_pretrained(source, revision=revision, dtype=dtype))


def _freeze_property(obj, name: str, value) -> None:
    """Makes property `name` of `obj` return `value`, through a subclass of the same name."""
    base = type(obj)
    obj.__class__ = type(base.__name__, (base,), {name: property(lambda _: value),
                                                  "__module__": base.__module__})


class Engine:
    def __init__(self, settings: Settings, device: torch.device):
        self.settings = settings
        self.device = device
        self.dtype = _DTYPES[settings.model.dtype if device.type == "cuda"
                             else settings.model.cpu_dtype]
        if device.type == "cuda":
            # Allocations without an explicit device must land on this instance's GPU, never
            # on GPU 0 of a multi-GPU host.
            torch.cuda.set_device(device)
        self._calls, self._profile_call, self._fault_call = 0, 0, 0  # from ready on, below
        self.graphed: frozenset[str] = frozenset()  # modules replaying CUDA graphs
        self.lora = None  # adapters.LoraBank when config.yaml has adapters
        self.graph_pool: compiled_variants.GraphPool | None = None  # the transformer's graphs
        self.text_stack = None  # text_stack.TextStack when optimizations.text_encoder_stack
        started = time.perf_counter()
        self.pipe = load_pipeline(settings, device, self.dtype)
        self.pipe.set_progress_bar_config(disable=True)
        # diffusers finds these two by walking every module of the models, on every call and
        # every step, while the GPU waited for the first step (bench/results/
        # 2026-11-26-h100-c/results.md). Neither changes once the pipeline is loaded.
        _freeze_property(self.pipe, "_execution_device", device)
        _freeze_property(self.pipe.transformer, "dtype", self.pipe.transformer.dtype)
        self.controlnet = controlnets.load(settings, device, self.dtype)
        self._timer: StageTimer | None = None  # the running call's, for the module hooks
        time_module(self.pipe.vae.encoder, "vae_encode", "denoise", lambda: self._timer)
        if self.controlnet is not None:
            time_module(self.controlnet, "control", "denoise", lambda: self._timer)
        self.pipes = {TEXT_TO_IMAGE: self.pipe}
        loaded = time.perf_counter() - started
        optimized = optimizations.optimize(optimizations.Context(
            pipe=self.pipe, settings=settings, device=device, report=optimizations.Report(),
            run_once=self._first_run))
        self.report = optimized.report
        self.attention_backend = optimized.attention_backend
        self.graphed = optimized.graphed
        self.lora = optimized.lora
        self.graph_pool = optimized.graph_pool
        self.text_stack = optimized.text_stack
        # After the rewrites: the mode pipelines share the optimized modules, and the ControlNet
        # pipelines bind the ControlNet to the optimized transformer's shared parts.
        self.pipes = self._mode_pipelines()
        self.load_seconds = time.perf_counter() - started
        self.warmup_seconds = self._warmup()
        for shapes in optimized.static_shapes:
            shapes.learning = False
        log.info("engine ready on %s (%s, weights: %s): load %.1f s, warmup %.1f s",
                 device, settings.model.dtype if device.type == "cuda" else
                 settings.model.cpu_dtype, settings.model.weights_label,
                 self.load_seconds, self.warmup_seconds)
        # One line for benchmarks (bench/server.py reads it): where the start's time went.
        log.info("startup phases (s): %s", json.dumps({
            "load": round(loaded, 3),
            "steps": {o.switch: o.seconds for o in self.report.outcomes if o.seconds},
            "warmup": round(self.warmup_seconds, 3)}))
        if device.type == "cuda":
            self._apply_memory_budget()
            log.info("GPU memory held by the instance on %s: %s", device, self.memory_by_gpu())
        self._calls, self._profile_call = 0, int(os.environ.get(PROFILE_ENV) or 0)
        self._fault_call = int(os.environ.get(FAULT_ENV) or 0)

    def _mode_pipelines(self) -> dict:
        from diffusers import (ZImageControlNetInpaintPipeline, ZImageControlNetPipeline,
                               ZImageImg2ImgPipeline, ZImageInpaintPipeline)

        parts = self.pipe.components
        pipes = {TEXT_TO_IMAGE: self.pipe, IMAGE_TO_IMAGE: ZImageImg2ImgPipeline(**parts),
                 INPAINT: ZImageInpaintPipeline(**parts)}
        if self.controlnet is not None:
            pipes[CONTROLNET] = ZImageControlNetPipeline(**parts, controlnet=self.controlnet)
            pipes[CONTROLNET_INPAINT] = ZImageControlNetInpaintPipeline(
                **parts, controlnet=self.controlnet)
        for mode, pipe in pipes.items():
            if mode != TEXT_TO_IMAGE:
                pipe.set_progress_bar_config(disable=True)
                _freeze_property(pipe, "_execution_device", self.device)
        return pipes

    def _apply_memory_budget(self) -> None:
        """limits.gpu_memory_gib, from ready on: loading builds and rewrites weights with
        transient copies that serving never needs again (bench/results/2026-12-01-h200), so the
        budget bounds what serving holds. The peak statistics restart here too."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        if (budget := self.settings.limits.gpu_memory_gib) is not None:
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget * 2**30 / total),
                                                       self.device)

    def memory_by_gpu(self) -> str:
        """Memory this process's allocator holds on every visible GPU: an instance must hold
        its own GPU's alone (reading the stats creates no context on the others)."""
        return "; ".join(
            f"cuda:{d} allocated {torch.cuda.memory_allocated(d) / 2**30:.2f} GiB, "
            f"reserved {torch.cuda.memory_reserved(d) / 2**30:.2f} GiB"
            for d in range(torch.cuda.device_count()))

    def _grad_mode(self):
        return torch.inference_mode() if self.settings.optimizations.inference_mode \
            else torch.no_grad()

    def _request(self, prompt: str, size: int, steps: int) -> GenerationRequest:
        return GenerationRequest(prompt=prompt, height=size, width=size, num_inference_steps=steps,
                                 guidance_scale=self.settings.defaults.guidance_scale, seed=0,
                                 output_format="raw")

    def _first_run(self, ctx: optimizations.Context, height: int | None = None,
                   width: int | None = None, steps: int = 1) -> list[np.ndarray]:
        """A run with what the optimization steps so far left, by default one step at the
        default size: compiled code is first traced, and made static, for the size served
        most."""
        self.graphed, self.lora, self.graph_pool = ctx.graphed, ctx.lora, ctx.graph_pool
        self.text_stack = ctx.text_stack
        defaults = self.settings.defaults
        return self.run([dataclasses.replace(
            self._request("first run", 0, steps), height=height or defaults.height,
            width=width or defaults.width)]).pixels

    def _warmup(self) -> float:
        """Runs each warmup size before the model reports ready; with torch.compile also as a
        full batch of unequal prompts. Otherwise a client's first batch of two, its first new
        caption length or its first new image size pays a recompile (tens of seconds on the
        full model); after two shapes the compiled code treats a dimension as dynamic."""
        warm = self.settings.optimizations.warmup
        if not warm.enabled:
            return 0.0
        started = time.perf_counter()
        compiled = self.report.status("torch_compile") == "applied"
        for height, width in warm.sizes:
            batch = self.settings.limits.images_per_call(height, width) if compiled else 1
            base = dataclasses.replace(self._request("warmup", 0, warm.num_inference_steps),
                                       height=height, width=width)
            for size in sorted({1, batch}):
                # Unequal prompts: the batch needs an attention mask, and its longest prompt
                # pads past the single one's 64 tokens, so caption length turns dynamic too.
                requests = [dataclasses.replace(base, prompt="warmup " + "words " * (40 * i))
                            for i in range(size)]
                result = self.run(requests)
                log.info("warmup %dx%d x%d: %s", height, width, size, result.timings_ms)
            if compiled:
                self._warm_image_modes(base)
        return time.perf_counter() - started

    def _warm_image_modes(self, base: GenerationRequest) -> None:
        """One image-to-image and, with a ControlNet, one ControlNet image at a warmup size:
        the transformer's compiled code meets the control hints there for the first time and
        compiles again, and the VAE encoder picks its convolution kernels (10.5 s and 2.2 s
        for the first such request on an H200: bench/results/2026-12-01-h200b/NOTES.md).
        The inpainting modes run the same code with other inputs."""
        gray = Image.new("RGB", (base.width, base.height), (128, 128, 128))
        modes = [dataclasses.replace(base, image=gray, strength=1.0)]
        if self.controlnet is not None:
            modes.append(dataclasses.replace(base, control_image=gray,
                                             control_scale=self.settings.defaults.control_scale))
        for request in modes:
            result = self.run([request])
            log.info("warmup %dx%d %s: %s", base.height, base.width, request.mode,
                     result.timings_ms)

    @functools.cached_property
    def _template_parts(self) -> tuple[list[int], list[int]]:
        """The chat template's token ids before and after the user's text (diffusers' template:
        one user message, a generation prompt, thinking enabled)."""
        marker = "\x00zimage-prompt\x00"
        text = self.pipe.tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True,
            enable_thinking=True)
        if text.count(marker) != 1:
            raise RuntimeError("the tokenizer's chat template does not hold the prompt once")
        before, after = text.split(marker)
        return (self.pipe.tokenizer(before, add_special_tokens=False).input_ids,
                self.pipe.tokenizer(after, add_special_tokens=False).input_ids)

    def token_ids(self, text: str) -> list[int]:
        """The text encoder's input for `text`: the chat template around it, with the user's
        text tokenized as text. Tokenizing the templated string whole, as diffusers does, turns
        `<|im_end|>` or `<think>` inside a prompt into control tokens that end the user's
        message early; for text without them both give the same ids (tests)."""
        before, after = self._template_parts
        return before + self.pipe.tokenizer(text, add_special_tokens=False,
                                            split_special_tokens=True).input_ids + after

    def count_tokens(self, text: str) -> int:
        """Tokens the text encoder sees for `text`, chat template included."""
        return len(self.token_ids(text))

    def encode_prompts(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """diffusers' ZImagePipeline._encode_prompt, padded to the longest prompt of the call
        instead of to max_prompt_tokens when `prompt_padding` is longest.

        Padding goes on the right whatever the checkpoint's tokenizer says: the text encoder is
        causal, so a real token never sees a pad token on its right, the embeddings are those
        of an unpadded prompt, computed over ~60 tokens instead of 512, and each prompt's
        embeddings are its first tokens.
        """
        tokenizer, limit = self.pipe.tokenizer, self.settings.limits.max_prompt_tokens
        longest = self.settings.optimizations.prompt_padding == "longest"
        inputs = tokenizer.pad({"input_ids": [self.token_ids(p)[:limit] for p in prompts]},
                               padding="longest" if longest else "max_length", max_length=limit,
                               pad_to_multiple_of=64 if longest else None, padding_side="right",
                               return_tensors="pt")
        # use_cache=False: a fresh KV cache per call is work nobody reads, and its state fails
        # the compiled layers' guards, so they recompiled on every prompt.
        mask = inputs.attention_mask.bool()
        graphs = "text_encoder" in self.graphed
        if graphs:
            # A new run of the layers' CUDA graphs: their outputs' memory is reused by it.
            torch.compiler.cudagraph_mark_step_begin()
        if self.text_stack is not None:
            # Checked on the host: no device sync, and an unpadded call keeps SDPA's causal path.
            hidden = self.text_stack(inputs.input_ids.to(self.device),
                                     None if bool(mask.all()) else mask.to(self.device))
        else:
            hidden = self.pipe.text_encoder(
                input_ids=inputs.input_ids.to(self.device), attention_mask=mask.to(self.device),
                output_hidden_states=True, use_cache=False).hidden_states[-2]
        # Slicing by lengths known on the host avoids the device sync of a boolean index.
        out = [hidden[i, :n] for i, n in enumerate(mask.sum(dim=1).tolist())]
        # The next replay (the negative prompts', or the next call's) overwrites graph outputs.
        return [t.clone() for t in out] if graphs else out

    def _noise(self, requests: Sequence[GenerationRequest]) -> torch.Tensor:
        """The starting latents, drawn by ZImagePipeline.prepare_latents on the host: each row
        from its request's seed on a CPU generator."""
        first, pipe = requests[0], self.pipe
        return pipe.prepare_latents(
            len(requests), pipe.transformer.in_channels, first.height, first.width,
            torch.float32, torch.device("cpu"),
            [torch.Generator("cpu").manual_seed(r.seed) for r in requests]).to(self.device)

    def run(self, requests: Sequence[GenerationRequest],
            should_stop: Callable[[], bool] | None = None) -> BatchResult:
        """One pipeline call for requests that share size, steps and guidance.

        Each image's starting noise comes from its own seed on a CPU generator, so an image is
        the same whether it ran alone or in a batch, and on any device.
        """
        self._calls += 1
        if self._calls == self._fault_call:
            self._break_device()
        if self._calls != self._profile_call:
            return self._run(requests, should_stop)
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                               if self.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            result = self._run(requests, should_stop)
        kernels = kernel_times_ms(prof)
        log.info("profile of call %d (%s): kernels %.1f ms of %.1f ms; stages %s; top: %s",
                 self._calls, self.device, sum(ms for _, ms in kernels),
                 result.timings_ms["compute"], result.timings_ms,
                 "; ".join(f"{name[:80]} {ms:.1f} ms" for name, ms in kernels[:8]))
        return result

    def _break_device(self) -> None:
        log.warning("%s is set: breaking %s on purpose", FAULT_ENV, self.device)
        if self.device.type != "cuda":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        # An out-of-bounds index asserts on the device; the error is sticky from here on.
        index = torch.full((1,), 1 << 20, device=self.device, dtype=torch.long)
        torch.zeros(1, device=self.device)[index].item()

    def _mode_inputs(self, requests: Sequence[GenerationRequest]) -> dict:
        """The mode's own arguments of its diffusers pipeline. The strength modes draw their
        noise inside the pipeline, after the VAE has sampled each image's latents from the same
        generator (diffusers' order); the others start from `_noise`, as text-to-image does."""
        first, mode = requests[0], requests[0].mode
        inputs = {}
        if mode in STRENGTH_MODES:
            inputs.update(strength=first.strength, generator=[
                torch.Generator("cpu").manual_seed(r.seed) for r in requests])
        else:
            inputs["latents"] = self._noise(requests)
        if first.image is not None:
            inputs["image"] = [r.image for r in requests]
        if first.mask is not None:
            inputs["mask_image"] = [r.mask for r in requests]
        if mode in CONTROL_MODES:
            inputs.update(control_image=[r.control_image for r in requests],
                          controlnet_conditioning_scale=first.control_scale)
        return inputs

    def _run(self, requests: Sequence[GenerationRequest],
             should_stop: Callable[[], bool] | None) -> BatchResult:
        first = requests[0]
        if any(r.group_key != first.group_key for r in requests):
            raise ValueError("one pipeline call needs one mode, size, step count, guidance "
                             "and strength")
        pipe, cfg = self.pipes.get(first.mode), first.guidance_scale > 0
        if pipe is None:
            raise ValueError(f"mode {first.mode} needs a ControlNet, and none is loaded")
        timer = StageTimer(self.device)
        stage = timer.stage
        steps_done = 0

        def on_step_end(pipeline, step, timestep, callback_kwargs):
            nonlocal steps_done
            steps_done = step + 1
            if should_stop is not None and should_stop():
                pipeline._interrupt = True
            return {}

        with self._grad_mode():
            # A blocking copy to the GPU waits for the stream's queued work. Made here, before
            # text encoding is queued, the starting noise's copy waits for nothing; made inside
            # the pipeline call, it held the CPU until text encoding had finished.
            inputs = self._mode_inputs(requests)
            if self.lora is not None:
                self.lora.activate(first.loras)
            with stage("text_encode"):
                prompt_embeds = self.encode_prompts([r.prompt for r in requests])
                negative_embeds = self.encode_prompts(
                    [r.negative_prompt or "" for r in requests]) if cfg else []
            self._timer = timer  # the VAE encoder's and the ControlNet's hooks time into it
            try:
                with stage("denoise"), self._graphs(requests, prompt_embeds, negative_embeds,
                                                    cfg) as graphs:
                    latents = pipe(
                        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                        height=first.height, width=first.width,
                        num_inference_steps=first.num_inference_steps,
                        guidance_scale=first.guidance_scale, **inputs,
                        output_type="latent", return_dict=False,
                        callback_on_step_end=on_step_end,
                    )[0]
            finally:
                self._timer = None
            if pipe.interrupt:
                raise GenerationCancelled(
                    f"all requests of the batch were cancelled; stopped after {steps_done} of "
                    f"{first.denoise_steps} denoising steps")
            with stage("vae_decode"):
                vae = pipe.vae
                latents = latents.to(vae.dtype) / vae.config.scaling_factor + \
                    vae.config.shift_factor
                images = vae.decode(latents, return_dict=False)[0]
                # The same rounding as diffusers' postprocess, done on the device so only
                # uint8 pixels cross to the host.
                pixels = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
                pixels = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        timings = timer.timings_ms()
        timings["compute"] = round(sum(timings.values()), 3)
        return BatchResult(pixels=list(pixels), timings_ms=timings, cuda_graphs=graphs)

    def _graphs(self, requests: Sequence[GenerationRequest], prompt_embeds: list[torch.Tensor],
                negative_embeds: list[torch.Tensor], cfg: bool):
        """The graph pool's scope for this call (compiled_variants.GraphPool), or one that
        yields False without a pool."""
        if self.graph_pool is None:
            return contextlib.nullcontext(False)
        first = requests[0]
        key = (len(requests), first.height, first.width,
               compiled_variants.caption_bucket([len(e) for e in prompt_embeds + negative_embeds]),
               first.mode + ("+guidance" if cfg else ""))
        return self.graph_pool.call(key)
