"""Z-Image pipelines with random weights, for serving without a weights download.

`tiny` writes a small random pipeline to disk with `save_pretrained`, so it is then served by the
same `from_pretrained` path as real weights. `dummy` builds the full Z-Image-Turbo architecture
from the config files shipped in `architectures/` (as vLLM's `dummy` load format does): right
for timing and memory, meaningless as images.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

ARCHITECTURE = "z_image_turbo"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3's template, reduced to what ZImagePipeline uses (user turn, generation prompt, thinking).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)
_CORPUS = (
    "a photo of a cat sitting on a red chair in the sun",
    "an astronaut riding a horse on the moon, digital art, highly detailed",
    "a bowl of ramen with an egg, studio lighting, 35mm, bokeh",
    "mountains at dawn over a misty lake, oil painting, warm colors",
    "portrait of an old fisherman, black and white, film grain",
    "the quick brown fox jumps over the lazy dog 0123456789",
)


def architecture_config(component: str) -> dict[str, Any]:
    """The shipped config of one Z-Image-Turbo component (transformer, text_encoder, vae, ...)."""
    path = resources.files(__package__) / "architectures" / ARCHITECTURE / f"{component}.json"
    return json.loads(path.read_text(encoding="utf-8"))


def build_tokenizer(vocab_size: int = 512):
    """A small byte-level BPE with Qwen's special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE, model_max_length=131072,
    )


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**architecture_config("scheduler"))


def build_tiny_pipeline(seed: int = 0):
    """A Z-Image pipeline of a few hundred thousand random parameters, same code paths."""
    from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ))
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
        cap_feat_dim=32, rope_theta=256.0, t_scale=1000.0, axes_dims=[4, 6, 6],
        axes_lens=[1536, 512, 512],
    )
    vae_config = architecture_config("vae")
    vae_config.update(block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=4)
    vae = AutoencoderKL(**vae_config)
    return ZImagePipeline(scheduler=_scheduler(), vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)


def _write_once(directory: str | os.PathLike[str], marker: str, build, what: str) -> Path:
    """Saves `build()` to `directory` once, through a staging folder renamed into place, so
    instances starting together do not race; `marker` is the file that shows it is there."""
    target = Path(directory).expanduser()
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        build().save_pretrained(staging)
        try:
            staging.rename(target)
            log.info("wrote the %s to %s", what, target)
        except OSError:
            if not (target / marker).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_tiny_pipeline(directory: str | os.PathLike[str], seed: int = 0) -> Path:
    """Writes the tiny pipeline to `directory` once; instances starting together do not race."""
    return _write_once(directory, "model_index.json", lambda: build_tiny_pipeline(seed),
                       "tiny random demo pipeline")


@contextlib.contextmanager
def _default(device: torch.device, dtype: torch.dtype):
    """Builds modules straight on `device` in `dtype`: 10B parameters initialised on a GPU take
    seconds, on a CPU in float32 minutes and 40 GB."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def build_dummy_pipeline(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The full Z-Image-Turbo architecture with random weights, built on `device`."""
    from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    with _default(device, dtype):
        text_encoder = Qwen3Model(Qwen3Config(**architecture_config("text_encoder")))
        transformer = ZImageTransformer2DModel(**architecture_config("transformer"))
        vae = AutoencoderKL(**architecture_config("vae"))
    for module in (text_encoder, transformer, vae):
        module.eval().requires_grad_(False)
    return ZImagePipeline(scheduler=_scheduler(), vae=vae, text_encoder=text_encoder,
                          tokenizer=build_tokenizer(), transformer=transformer)


def _controlnet_config(tiny: bool) -> dict[str, Any]:
    config = {k: v for k, v in architecture_config("controlnet").items()
              if not k.startswith("_")}
    if tiny:
        # The tiny transformer's width, heads and layers (build_tiny_pipeline), same Union layout.
        config.update(control_layers_places=[0, 1], control_refiner_layers_places=[0], dim=32,
                      n_refiner_layers=1, n_heads=2, n_kv_heads=2)
    return config


def build_tiny_controlnet(seed: int = 0):
    """A random ZImageControlNetModel of the Union layout that fits the tiny pipeline."""
    from diffusers import ZImageControlNetModel

    torch.manual_seed(seed)
    model = ZImageControlNetModel(**_controlnet_config(tiny=True))
    with torch.no_grad():
        for parameter in model.parameters():
            # The control outputs start at zero (a trained ControlNet learns them); random
            # ones make the control image change the tiny pipeline's image.
            if not parameter.any():
                parameter.normal_(std=0.3)
    return model


def ensure_tiny_controlnet(directory: str | os.PathLike[str], seed: int = 0) -> Path:
    """Writes the tiny ControlNet to `directory` once, to be loaded with from_pretrained."""
    return _write_once(directory, "config.json", lambda: build_tiny_controlnet(seed),
                       "tiny random ControlNet")


def build_dummy_controlnet(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The ControlNet Union 2.1 architecture with random weights, built on `device`."""
    from diffusers import ZImageControlNetModel

    torch.manual_seed(seed)
    with _default(device, dtype):
        controlnet = ZImageControlNetModel(**_controlnet_config(tiny=False))
    return controlnet.eval().requires_grad_(False)


def count_parameters(component: str) -> int:
    """Parameters of a shipped component, counted on the meta device (no memory needed)."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    builders = {
        "transformer": lambda c: ZImageTransformer2DModel(**c),
        "text_encoder": lambda c: Qwen3Model(Qwen3Config(**c)),
        "vae": lambda c: AutoencoderKL(**c),
    }
    with torch.device("meta"):
        module = builders[component](architecture_config(component))
    return sum(p.numel() for p in module.parameters())
