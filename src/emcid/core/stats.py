"""Preservation statistics: the uncentred second moment C = E[k k^T] of every edited fc2 input.

Computed over all non-padding tokens of a caption corpus, once per model, layer, corpus and
sample count, and cached on disk as safetensors. Stage II weighs how much each direction of
key space is in use by these matrices, which is what protects unrelated concepts.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import StatsMismatchError
from .bundle import ModelBundle
from .cache import TensorCache, content_key
from .corpus import read_corpus as read_corpus  # re-exported: the editors read captions from here
from .hooks import capture

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = 100_000  # release: 100,000 captions


def default_corpus(bundle: ModelBundle, count: int) -> list[str]:
    """The embedded model's own caption corpus (with its task prompts where it draws styles
    and colour words), else the built-in ImageNet caption corpus."""
    if bundle.is_embedded and bundle.settings.get("tasks"):
        from ..mini.styles import tasks_caption_corpus

        return tasks_caption_corpus(count)
    if bundle.is_embedded:
        from ..mini.world import caption_corpus

        return caption_corpus(count)
    from ..concepts import builtin_caption_corpus

    return builtin_caption_corpus(count)


def captions_without(captions: Sequence[str], names: Sequence[str]) -> list[str]:
    """The captions that name none of ``names`` (whole words, any case), so statistics over
    them preserve what an edit of those names keeps rather than the names themselves."""
    if not names:
        return list(captions)
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(
        re.escape(n.casefold()) for n in sorted(set(names), key=len, reverse=True)) + r")(?!\w)")
    return [c for c in captions if not pattern.search(c.casefold())]


def corpus_hash(captions: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]


def encoder_fingerprint(bundle: ModelBundle, module_name: str) -> str:
    """Statistics depend on the module's own text encoder only (not on the UNet or VAE)."""
    return bundle.fingerprint(components=(module_name.split(".")[0],))


def _check(name: str, matrix: torch.Tensor, meta: dict, bundle: ModelBundle, width: int) -> None:
    expected = encoder_fingerprint(bundle, name)
    if meta.get("fingerprint") != expected or tuple(matrix.shape) != (width, width):
        raise StatsMismatchError(
            f"statistics for {name} were computed for model {meta.get('fingerprint')} with shape "
            f"{tuple(matrix.shape)}, but this model is {expected} with {width} fc2 "
            "inputs; delete the file or recompute"
        )


@torch.no_grad()
def running_sums(bundle: ModelBundle, slot_name: str, names: list[str], captions: Sequence[str],
                 batch_size: int = 256, progress: bool = False,
                 ) -> Iterator[tuple[int, dict[str, torch.Tensor], int]]:
    """After each batch of captions: (captions done, float64 sums of k k^T per module, tokens).

    One encoder's modules; all non-padding tokens count. Each batch's sum is one float32
    matmul (fast); the totals are float64, so rounding does not grow with the corpus. The
    sums are updated in place: copy what must outlive the next batch.
    """
    slot = bundle.slot(slot_name)
    modules = {n: bundle.module(n) for n in names}
    sums = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=bundle.device)
            for n, m in modules.items()}
    count = 0
    starts = range(0, len(captions), batch_size)
    for start in tqdm(starts, desc=f"statistics {slot_name}", disable=not progress):
        batch = list(captions[start:start + batch_size])
        encoded = slot.tokenizer(batch, padding="longest", truncation=True,
                                 max_length=slot.tokenizer.model_max_length, return_tensors="pt")
        mask = encoded.attention_mask.bool().to(bundle.device)
        with capture(modules, what="input") as records:
            slot.encoder(encoded.input_ids.to(bundle.device), attention_mask=mask.long())
        count += int(mask.sum())
        for name in names:
            keys = records[name][0][mask].float()
            sums[name] += (keys.T @ keys).double()
        yield start + len(batch), sums, count


def _accumulate(bundle: ModelBundle, names: list[str], captions: Sequence[str],
                batch_size: int, progress: bool) -> dict[str, torch.Tensor]:
    """E[k k^T] over all non-padding tokens, per module, each divided by its own encoder's
    token count (SDXL's two tokenizers may count differently)."""
    by_slot: dict[str, list[str]] = {}
    for name in names:
        by_slot.setdefault(name.split(".")[0], []).append(name)
    result: dict[str, torch.Tensor] = {}
    for slot_name, slot_names in by_slot.items():
        *_, (_, sums, count) = running_sums(bundle, slot_name, slot_names, captions, batch_size,
                                            progress)  # the totals after the last batch
        result.update({n: (s / count).float().cpu() for n, s in sums.items()})
    return {n: result[n] for n in names}


def second_moments(
    bundle: ModelBundle,
    module_names: Sequence[str],
    captions: Sequence[str] | None = None,
    sample_count: int = DEFAULT_SAMPLES,
    batch_size: int = 256,
    cache: TensorCache | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """C = E[k k^T] of each module's input, from the cache where possible."""
    captions = list(captions) if captions is not None else default_corpus(bundle, sample_count)
    captions = captions[:sample_count]
    cache = cache or TensorCache("stats")
    corpus = corpus_hash(captions)
    models = {n: encoder_fingerprint(bundle, n) for n in module_names}
    keys = {n: content_key(model=models[n], module=n, corpus=corpus, samples=len(captions))
            for n in module_names}
    result: dict[str, torch.Tensor] = {}
    for name, key in keys.items():
        entry = cache.load(key)
        if entry is not None:
            _check(name, entry[0]["second_moment"], entry[1], bundle, bundle.module(name).in_features)
            result[name] = entry[0]["second_moment"]
    missing = [n for n in module_names if n not in result]
    if missing:
        log.info("computing statistics for %d modules over %d captions", len(missing), len(captions))
        fresh = _accumulate(bundle, missing, captions, batch_size, progress)
        for name, matrix in fresh.items():
            cache.save(keys[name], {"second_moment": matrix},
                       {"fingerprint": models[name], "module": name, "corpus": corpus,
                        "samples": len(captions)})
            result[name] = matrix
    return {n: result[n] for n in module_names}

