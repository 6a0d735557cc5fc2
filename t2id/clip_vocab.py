"""CLIP's BPE vocabulary, rebuilt from the merges file open_clip ships (no download needed).

Both tiny models (SDXL's two text encoders in t2id.lora.models, the CLIP scorer in
t2id.evaluate.clip_score) tokenize prompts exactly as the real openai/clip-* tokenizers do.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

from t2id.errors import UserError

CLIP_CONTEXT = 77  # CLIP's text context length; longer prompts are truncated


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map (256 entries)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def open_clip_bpe_path() -> Path:
    """The `bpe_simple_vocab_16e6.txt.gz` merges file that open_clip ships."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise UserError(f"{path} is missing: reinstall open_clip_torch (it ships CLIP's BPE vocabulary)")
    return path


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's 49408-token vocabulary and its 48894 merges, derived as CLIP's own tokenizer does.

    vocab = 256 byte tokens + their '</w>' (end of word) variants + one token per merge +
    <|startoftext|>, <|endoftext|>  (Radford et al. 2021, openai/CLIP simple_tokenizer.py).
    """
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # line 0 is a version header
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A transformers CLIPTokenizer with the real CLIP vocabulary (max length 77)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], pad_token=pad_token,
                         model_max_length=CLIP_CONTEXT)
