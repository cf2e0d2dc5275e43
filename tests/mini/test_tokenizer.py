"""The CLIP-compatible tokenizer trained on the world's text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from transformers import CLIPTokenizer

from emcid.mini import default_model_dir, world
from emcid.mini.tokenizer import BOS, EOS, learn_merges
from emcid.tiny import byte_symbols


def _folders(trained_tokenizer):
    folders = [trained_tokenizer]
    shipped = default_model_dir() / "tokenizer"
    if (shipped / "vocab.json").exists():
        folders.append(shipped)
    return folders


def test_clip_format(trained_tokenizer):
    for folder in _folders(trained_tokenizer):
        vocab = json.loads((folder / "vocab.json").read_text())
        base = byte_symbols()
        assert all(vocab[b] == i for i, b in enumerate(base))
        assert all(vocab[b + "</w>"] == 256 + i for i, b in enumerate(base))
        assert vocab[BOS] == len(vocab) - 2 and vocab[EOS] == len(vocab) - 1
        assert (folder / "merges.txt").read_text().startswith("#version")


@pytest.mark.parametrize("which", [0, -1])
def test_every_concept_name_round_trips(trained_tokenizer, concepts, which):
    folder = _folders(trained_tokenizer)[which]
    tok = CLIPTokenizer.from_pretrained(str(folder))
    assert tok.bos_token == BOS and tok.eos_token == EOS and tok.pad_token == EOS
    names = [n for c in concepts for n in c.names]
    ids = tok(names).input_ids
    for name, seq in zip(names, ids, strict=True):
        assert seq[0] == tok.bos_token_id and seq[-1] == tok.eos_token_id
        assert tok.unk_token_id not in seq[1:-1]
        text = tok.decode(seq, skip_special_tokens=True)
        assert "".join(text.split()) == "".join(name.lower().split()), name
        assert tok(text).input_ids == seq
    longest = max(len(tok(p).input_ids) for c in concepts[:200] for p, _ in world.free_form_prompts(c))
    assert longest <= tok.model_max_length


def test_training_is_deterministic(trained_tokenizer, tmp_path):
    """Another training, in a process with another string-hash seed, writes the same files."""
    code = "import sys; from emcid.mini.tokenizer import train_tokenizer; train_tokenizer(sys.argv[1])"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (trained_tokenizer / name).read_bytes(), name
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    merges = (tmp_path / "merges.txt").read_text().splitlines()[1:]
    assert len(vocab) == 4096 and len(merges) == 4096 - 512 - 2


def test_merges_take_the_most_frequent_pair_and_break_ties_by_the_smaller_pair():
    counts = Counter({("c", "d</w>"): 3, ("b", "a</w>"): 3, ("a", "b", "a</w>"): 1, ("x", "y</w>"): 1})
    # 4 "ba" (3 + 1 inside "aba") beat 3 "cd"; pairs seen once ("x y", "a ba") end training
    assert learn_merges(counts, 10, known=[]) == [("b", "a</w>"), ("c", "d</w>")]
    assert learn_merges(Counter({("a", "b</w>"): 2, ("c", "d</w>"): 2}), 1, known=[]) == [("a", "b</w>")]
    assert learn_merges(Counter({("a", "b</w>"): 2}), 5, known=["ab</w>"]) == []  # no symbol twice
