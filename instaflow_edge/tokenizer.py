"""An offline CLIP tokenizer: a byte-level BPE vocabulary built here, no download.

CLIP's real vocabulary (49,408 entries) comes with real checkpoints. Presets need a tokenizer that
works with no network, so we build one in CLIP's format (``vocab.json`` + ``merges.txt``): the 256
byte-level symbols, the same with the end-of-word mark ``</w>``, whole-word tokens for a word list
(merged left to right), and the two special tokens. Any text tokenizes (unknown words fall back to
characters); listed words are single tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words common in image prompts; the digits preset adds its own prompt vocabulary.
PROMPT_WORDS = """
a an the of in on at with and by for to from under over near behind inside
red orange yellow green blue purple pink white black gray grey brown golden silver dark bright
fox cat dog horse bird owl eagle fish whale lion tiger bear wolf deer rabbit dragon robot person man woman
child girl boy astronaut knight wizard car bicycle train ship boat airplane house castle tower bridge
lighthouse city street forest tree flower rose garden mountain river lake sea ocean beach desert island
sky cloud sun moon star stars night day sunset sunrise snow rain storm fog winter summer spring autumn
portrait photo photograph painting drawing sketch illustration render style oil watercolor digital art
detailed highly realistic photorealistic cinematic lighting beautiful cute small big tiny large old new
futuristic ancient fantasy magical epic 4k 8k hd sharp soft warm cold colorful vintage minimal
sitting standing running flying walking sleeping eating reading playing wearing holding looking
hat coat dress glasses book cup coffee tea table chair window door room kitchen library
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """CLIP-format (vocab, merges) whose merges spell every word of ``words`` as one token."""
    byte_syms = list(bytes_to_unicode().values())
    vocab_list = byte_syms + [s + "</w>" for s in byte_syms]
    seen = set(vocab_list)
    merges: list[str] = []
    enc = bytes_to_unicode()
    for word in dict.fromkeys(w.lower() for w in words):  # ordered, unique
        syms = [enc[b] for b in word.encode("utf-8")]
        if len(syms) < 2:
            continue
        syms[-1] += "</w>"
        left = syms[0]
        for right in syms[1:]:
            merged = left + right
            if merged not in seen:
                merges.append(f"{left} {right}")
                vocab_list.append(merged)
                seen.add(merged)
            left = merged
    vocab_list += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def write_tokenizer_files(folder: str | Path, words: list[str]) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` for ``words`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


def build_tokenizer(words: list[str], folder: str | Path, model_max_length: int = 77):
    """A ``CLIPTokenizer`` over ``words``, built from files written into ``folder``."""
    from transformers import CLIPTokenizer

    vocab_path, merges_path = write_tokenizer_files(folder, words)
    # positional: transformers 4.x names these vocab_file/merges_file, 5.x vocab/merges (paths accepted)
    return CLIPTokenizer(
        str(vocab_path),
        str(merges_path),
        model_max_length=model_max_length,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,  # SD1.x pads with the end token
        unk_token=EOS,
    )
