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
from typing import Any, Callable

import torch

from . import qwen_tokenizer

log = logging.getLogger(__name__)

ARCHITECTURE = "z_image_turbo"
TOKENIZER_CACHE = "~/.cache/zimage-triton"  # beside config.yaml's default model.demo_dir
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
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
    """The tiny pipeline's: a small byte-level BPE with Qwen's special tokens and Qwen3's chat
    template, its vocabulary small enough for a text encoder of a few thousand parameters."""
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
        chat_template=qwen_tokenizer.CHAT_TEMPLATE, model_max_length=131072,
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


def _write_once(target: Path, marker: str, write: Callable[[Path], None], what: str) -> Path:
    """Has `write` fill a staging folder beside `target`, then renames it into place, so
    instances starting together do not race; a target that has its `marker` file is kept."""
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        write(staging)
        try:
            staging.rename(target)
            log.info("wrote %s to %s", what, target)
        except OSError:
            if not (target / marker).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_tiny_pipeline(directory: str | os.PathLike[str], seed: int = 0) -> Path:
    """Writes the tiny pipeline to `directory` once."""
    return _write_once(Path(directory).expanduser(), "model_index.json",
                       lambda staging: build_tiny_pipeline(seed).save_pretrained(staging),
                       "the tiny random demo pipeline")


def dummy_tokenizer(cache: str | os.PathLike[str] = TOKENIZER_CACHE):
    """The dummy format's tokenizer (qwen_tokenizer), built once per ranks file into `cache`:
    building takes seconds of CPU, loading the saved one a fraction of that."""
    from transformers import PreTrainedTokenizerFast

    ranks = qwen_tokenizer.ranks_path()
    target = Path(cache).expanduser() / f"qwen3-tokenizer-{qwen_tokenizer.digest(ranks)}"
    _write_once(target, "tokenizer.json",
                lambda staging: qwen_tokenizer.build(ranks).save_pretrained(staging),
                f"the tokenizer {qwen_tokenizer.LABEL}")
    return PreTrainedTokenizerFast.from_pretrained(target)


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
    return freeze_weights(ZImagePipeline(scheduler=_scheduler(), vae=vae,
                                         text_encoder=text_encoder, tokenizer=dummy_tokenizer(),
                                         transformer=transformer))


def freeze_weights(pipe):
    """Every model of `pipe` in eval mode with no parameter requiring grad. Parameters that
    require grad are another input to compiled code: a compile cache written by a dummy run
    missed for the same weights loaded from a folder until loading froze them too
    (bench/results/2026-12-01-cpu-compile-cache/NOTES.md)."""
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.eval().requires_grad_(False)
    return pipe


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
    return _write_once(Path(directory).expanduser(), "config.json",
                       lambda staging: build_tiny_controlnet(seed).save_pretrained(staging),
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
