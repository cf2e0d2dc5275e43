"""A CLIP-compatible BPE tokenizer trained offline on the world's text.

CLIP's conventions are kept so that `CLIPTokenizer` loads the files unchanged and code
written for SD 1.x (subject-token location, padding, eos pooling) works as is: byte-level
base alphabet (all 256 symbols, plain and with the `</w>` end-of-word suffix), merges in
training order, and `<|startoftext|>` / `<|endoftext|>` at the end of the vocabulary.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer

from ..tiny import byte_symbols
from . import world

log = logging.getLogger(__name__)

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
#: Tokens per prompt (SD uses 77; the world's prompts are short, so 32 keeps it cheap).
MODEL_MAX_LENGTH = 32
_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+"""
)


def tokenizer_corpus() -> list[str]:
    """All text the world can produce: names in every template, free-form, fillers."""
    texts = []
    for c in world.load_concepts():
        for name in c.names:
            texts.append(name)
            texts.extend(t.format(name) for t in world.TRAIN_TEMPLATES[::9])
    texts.extend(t.format("") for t in world.TRAIN_TEMPLATES + world.FREE_FORM_TEMPLATES)
    texts.extend(world.FILLER_SENTENCES)
    return texts


def train_tokenizer(out_dir: str | Path, vocab_size: int = 4096) -> CLIPTokenizer:
    """Learn BPE merges on the world's text and write CLIP-format vocab.json/merges.txt."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = byte_symbols()
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    n_merges = vocab_size - 512 - 2
    trainer = trainers.BpeTrainer(
        vocab_size=n_merges + 300,  # the trainer counts its own alphabet; trimmed below
        min_frequency=2,
        initial_alphabet=base,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    vocab_list = base + [b + "</w>" for b in base]
    known = set(vocab_list)
    kept: list[tuple[str, str]] = []
    for a, b in merges:
        if len(vocab_list) >= vocab_size - 2:
            break
        if a not in known or b not in known or a + b in known:
            continue
        kept.append((a, b))
        vocab_list.append(a + b)
        known.add(a + b)
    vocab_list += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in kept:
            f.write(f"{a} {b}\n")
    clip_tok = CLIPTokenizer(vocab=vocab, merges=kept, model_max_length=MODEL_MAX_LENGTH)
    clip_tok.save_pretrained(out)
    (out / "tokenizer.json").unlink(missing_ok=True)  # vocab.json + merges.txt are the source
    clip_tok = load_tokenizer(out)
    log.info("tokenizer: %d tokens, %d merges -> %s", len(vocab), len(kept), out)
    return clip_tok


def load_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """Load the tokenizer the way diffusers does."""
    return CLIPTokenizer.from_pretrained(str(folder))
