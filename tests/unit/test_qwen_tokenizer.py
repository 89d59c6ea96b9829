"""The dummy format's tokenizer, built from dashscope's qwen.tiktoken: the same tokens as
tiktoken's encoding of those ranks, Qwen3's added tokens as single ids, Qwen3's chat template."""

from __future__ import annotations

import importlib.metadata

import pytest
import tiktoken

from zimage_backend import qwen_tokenizer, random_models

TEXTS = (
    "a lighthouse on a cliff at sunset, oil painting",
    "An astronaut riding a horse on the moon, 8K, ultra-detailed, volumetric light",
    "一只橘猫坐在红色的椅子上，阳光明媚，水彩画",
    "東京の夜景、ネオン、雨",
    "🐱🚀 emoji, ümlauts and naïve café 12345.678",
    "  leading spaces\n\nnew lines\tand tabs  ",
    "def f(x):\n    return x**2  # code",
)


@pytest.fixture(scope="module")
def tokenizer():
    return qwen_tokenizer.build()


@pytest.fixture(scope="module")
def reference():
    path = qwen_tokenizer.ranks_path()
    specials = {content: qwen_tokenizer.FIRST_ADDED_ID + i
                for i, (content, _) in enumerate(qwen_tokenizer.ADDED_TOKENS)}
    return tiktoken.Encoding("qwen", pat_str=qwen_tokenizer.PATTERN,
                             mergeable_ranks=qwen_tokenizer.load_ranks(path),
                             special_tokens=specials)


@pytest.mark.parametrize("text", TEXTS)
def test_tokens_are_tiktokens_with_the_same_ranks(tokenizer, reference, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == reference.encode(text)
    assert tokenizer.decode(ids) == text


def test_known_qwen_ids(tokenizer):
    # Qwen's documented encoding of "Hello, world"; ',' is byte 0x2c, rank 0x2c - 0x21.
    assert tokenizer.encode("Hello, world") == [9707, 11, 1879]


def test_added_tokens_are_single_ids_at_qwen3s_ids(tokenizer, reference):
    assert len(tokenizer) == 151669 <= random_models.architecture_config(
        "text_encoder")["vocab_size"]
    for offset, (content, special) in enumerate(qwen_tokenizer.ADDED_TOKENS):
        assert tokenizer.encode(content) == [151643 + offset], content
        assert tokenizer.encode(f"a{content}b")[1] == 151643 + offset
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<think>",
                                           "</think>"]) == [151644, 151645, 151667, 151668]
    assert tokenizer.eos_token_id == 151645 and tokenizer.pad_token_id == 151643
    text = "<|im_start|>user\nhi<|im_end|>"
    assert tokenizer.encode(text) == reference.encode(text, allowed_special="all")


@pytest.mark.parametrize("thinking,tail", [(True, ""), (False, "<think>\n\n</think>\n\n")])
def test_the_chat_template_renders_like_qwen3s(tokenizer, thinking, tail):
    """ZImagePipeline's call; Qwen3's template closes an empty <think> block when thinking is
    off and leaves the assistant turn open when it is on."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": TEXTS[2]}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=thinking)
    assert text == f"<|im_start|>user\n{TEXTS[2]}<|im_end|>\n<|im_start|>assistant\n{tail}"
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                    {"role": "assistant", "content": "<think>\nwhy\n</think>\n\nA"}]
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n")


def test_it_says_it_is_built_and_is_cached(tmp_path):
    first = random_models.dummy_tokenizer(tmp_path)
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith("qwen3-tokenizer-")
    config = (folder / "tokenizer_config.json").read_text(encoding="utf-8")
    assert qwen_tokenizer.LABEL in config
    mtime = (folder / "tokenizer.json").stat().st_mtime_ns
    again = random_models.dummy_tokenizer(tmp_path)
    assert (folder / "tokenizer.json").stat().st_mtime_ns == mtime  # loaded, not rebuilt
    assert again.encode(TEXTS[0]) == first.encode(TEXTS[0])
    assert qwen_tokenizer.LABEL in again.init_kwargs["built_from"]


def test_without_dashscope_the_error_says_what_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(qwen_tokenizer.RanksMissing, match=r"pip install --no-deps dashscope"):
        qwen_tokenizer.ranks_path()
