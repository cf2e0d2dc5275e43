"""A CLIP-compatible BPE tokenizer trained offline on the world's text.

CLIP's conventions are kept so that `CLIPTokenizer` loads the files unchanged and code
written for SD 1.x (subject-token location, padding, eos pooling) works as is: byte-level
base alphabet (all 256 symbols, plain and with the `</w>` end-of-word suffix), merges in
training order, and `<|startoftext|>` / `<|endoftext|>` at the end of the vocabulary.

The merges are learned here, in plain Python, rather than by `tokenizers`' `BpeTrainer`:
that trainer is not deterministic from run to run (huggingface/tokenizers issue 1794: the
hash-map order of the lazily created `</w>` symbols feeds its tie-breaking between pairs of
equal count), so two trainings on the same text gave different merges.txt files. Here ties
go to the lexicographically smallest pair, and the same text always gives the same files.
Only the word splitting (CLIP's normaliser and pre-tokeniser) still comes from `tokenizers`.
"""

from __future__ import annotations

import heapq
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, normalizers, pre_tokenizers
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


Pair = tuple[str, str]
Word = tuple[str, ...]


def word_counts(texts: Iterable[str]) -> Counter[Word]:
    """Each word of ``texts`` as byte symbols, the last one with `</w>`, and how often it occurs.

    Words are split as CLIP splits them (NFC, lower case, CLIP's pattern, byte-level symbols).
    """
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    splitter = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    chunks: Counter[str] = Counter()  # CLIP's words never span a space: split each chunk once
    for text, repeats in Counter(texts).items():
        for chunk in normalizer.normalize_str(text).split(" "):
            chunks[chunk] += repeats
    counts: Counter[Word] = Counter()
    for chunk, repeats in chunks.items():
        for word, _ in splitter.pre_tokenize_str(chunk):
            counts[(*word[:-1], word[-1] + "</w>")] += repeats
    return counts


def _pairs(word: Word) -> Iterable[Pair]:
    return zip(word, word[1:])


def _merge(word: Word, pair: Pair) -> Word:
    """``word`` with every occurrence of ``pair`` (left to right) joined into one symbol."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_merges(counts: Counter[Word], n_merges: int, known: Iterable[str],
                 min_count: int = 2) -> list[Pair]:
    """Up to ``n_merges`` BPE merges, each the most frequent adjacent pair at its turn.

    Ties go to the lexicographically smallest pair, so the result depends on the counts alone.
    A pair seen fewer than ``min_count`` times ends training; a pair that would rebuild a
    symbol already in the vocabulary (``known``) is passed over, so every symbol is made once.
    Pair counts are updated only in the words a merge touches (a heap with stale entries
    skipped), which keeps a few thousand merges to seconds.
    """
    words = list(counts)
    weights = list(counts.values())
    pair_counts: Counter[Pair] = Counter()
    holders: defaultdict[Pair, set[int]] = defaultdict(set)
    for index, word in enumerate(words):
        for pair in _pairs(word):
            pair_counts[pair] += weights[index]
            holders[pair].add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    known = set(known)
    merges: list[Pair] = []
    while heap and len(merges) < n_merges:
        negative, pair = heapq.heappop(heap)
        if pair_counts[pair] != -negative:
            continue  # stale: the count changed after this entry was pushed
        if -negative < min_count:
            break
        if pair[0] + pair[1] in known:
            continue
        merges.append(pair)
        known.add(pair[0] + pair[1])
        changed: set[Pair] = set()
        for index in sorted(holders.pop(pair)):
            old = words[index]
            new = _merge(old, pair)
            weight = weights[index]
            for gone in _pairs(old):
                pair_counts[gone] -= weight
                changed.add(gone)
            for made in _pairs(new):
                pair_counts[made] += weight
                holders[made].add(index)
                changed.add(made)
            words[index] = new
        for other in changed - {pair}:
            if pair_counts[other] > 0:
                heapq.heappush(heap, (-pair_counts[other], other))
    return merges


def train_tokenizer(out_dir: str | Path, vocab_size: int = 4096) -> CLIPTokenizer:
    """Learn BPE merges on the world's text and write CLIP-format vocab.json/merges.txt."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = byte_symbols()
    vocab_list = base + [b + "</w>" for b in base]
    kept = learn_merges(word_counts(tokenizer_corpus()), vocab_size - len(vocab_list) - 2,
                        known=vocab_list)
    vocab_list += [a + b for a, b in kept]
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
