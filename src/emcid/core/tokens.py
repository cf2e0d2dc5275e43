"""Where a concept sits in a prompt: its last token (the subject token every stage reads)."""

from __future__ import annotations

from collections.abc import Sequence
from string import Formatter

import torch

from ..errors import RequestError, quote


def normalise(text: str) -> str:
    """Case and runs of white space folded: how concepts are compared."""
    return " ".join(text.lower().split())


def subject_start(template: str) -> int:
    """Character offset of the concept in the formatted prompt (literal braces unescaped)."""
    offset = 0
    for literal, name, _, _ in Formatter().parse(template):
        offset += len(literal)
        if name is not None:
            return offset
    raise RequestError(f"prompt {quote(template)} has no '{{}}'")


def subject_positions(tokenizer, templates: Sequence[str], subject: str) -> torch.Tensor:
    """Index of the last token of ``subject`` inside each formatted template.

    Uses the tokenizer's character offsets, so multi-token concepts and punctuation next to
    the concept are handled. Raises if the subject falls outside the token window.
    """
    positions = []
    for template in templates:
        prompt = template.format(subject)
        start = subject_start(template)
        end = start + len(subject)
        encoded = tokenizer(
            prompt, truncation=False, return_offsets_mapping=True, add_special_tokens=True
        )
        inside = [
            i for i, (a, b) in enumerate(encoded["offset_mapping"]) if b > a and a < end and b > start
        ]
        if not inside:
            raise RequestError(
                f"subject {quote(subject)} not found among the tokens of {quote(prompt)}")
        last = inside[-1]
        if last >= tokenizer.model_max_length - 1:
            raise RequestError(
                f"prompt {quote(prompt)} is {len(encoded['input_ids'])} tokens long and "
                f"its subject {quote(subject)} ends at token {last}, beyond the "
                f"{tokenizer.model_max_length}-token window: shorten the prompt"
            )
        positions.append(last)
    return torch.tensor(positions, dtype=torch.long)


def check_window(tokenizer, prompts: Sequence[str], what: str) -> None:
    """Refuse a prompt longer than the tokenizer's window (77 tokens for CLIP): the pipelines
    cut it there without a word, so the edit would be made on another prompt than the one
    written. ``what`` names the prompts' request and encoder in the message."""
    limit = tokenizer.model_max_length
    for prompt, ids in zip(prompts, tokenizer(list(prompts), truncation=False).input_ids):
        if len(ids) > limit:
            raise RequestError(
                f"{what}: prompt {quote(prompt)} is {len(ids)} tokens long (with its start and end "
                f"tokens), over the {limit}-token window, past which the encoder reads nothing: "
                "shorten it")


def length_groups(positions: torch.Tensor, batch_size: int) -> list[list[int]]:
    """Prompt indices grouped by the length they are encoded at (subject position + 1), so a
    group stacks into one tensor with no padding; each group at most ``batch_size`` long.
    (Sorting by length and padding batches on the right costs more: the padded tokens.)"""
    by_length: dict[int, list[int]] = {}
    for index, position in enumerate(positions.tolist()):
        by_length.setdefault(position + 1, []).append(index)
    return [rows[start:start + batch_size] for rows in by_length.values()
            for start in range(0, len(rows), batch_size)]
