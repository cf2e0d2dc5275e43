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

from ..errors import OptionError, StatsMismatchError
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


def _name_pattern(names: Sequence[str]) -> re.Pattern:
    """Any of ``names`` as a whole word (longest first, so "sea lion" wins over "lion")."""
    alternatives = sorted({n.casefold() for n in names}, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, alternatives)) + r")(?!\w)")


def names_any(text: str, names: Sequence[str]) -> bool:
    """Whether ``text`` holds one of ``names`` as a whole word, any case."""
    return bool(names) and _name_pattern(names).search(text.casefold()) is not None


def split_captions(captions: Sequence[str], names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the captions that name none of ``names``, those that name one), whole words, any case."""
    if not names:
        return list(captions), []
    pattern = _name_pattern(names)
    kept: list[str] = []
    named: list[str] = []
    for caption in captions:
        (named if pattern.search(caption.casefold()) else kept).append(caption)
    return kept, named


def captions_without(captions: Sequence[str], names: Sequence[str]) -> list[str]:
    """The captions that name none of ``names`` (whole words, any case), so statistics over
    them preserve what an edit of those names keeps rather than the names themselves."""
    return split_captions(captions, names)[0]


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


def _sums(bundle: ModelBundle, names: list[str], captions: Sequence[str], batch_size: int,
          progress: bool) -> dict[str, tuple[torch.Tensor, int]]:
    """Per module: (float64 sum of k k^T on the CPU, its own encoder's token count); SDXL's
    two tokenizers may count differently."""
    by_slot: dict[str, list[str]] = {}
    for name in names:
        by_slot.setdefault(name.split(".")[0], []).append(name)
    result: dict[str, tuple[torch.Tensor, int]] = {}
    for slot_name, slot_names in by_slot.items():
        *_, (_, sums, count) = running_sums(bundle, slot_name, slot_names, captions, batch_size,
                                            progress)  # the totals after the last batch
        result.update({n: (s.cpu(), count) for n, s in sums.items()})
    return {n: result[n] for n in names}


def _accumulate(bundle: ModelBundle, names: list[str], captions: Sequence[str],
                batch_size: int, progress: bool) -> dict[str, tuple[torch.Tensor, int]]:
    """Per module: (E[k k^T] over all non-padding tokens as float32, the token count)."""
    return {n: ((s / count).float(), count)
            for n, (s, count) in _sums(bundle, names, captions, batch_size, progress).items()}


def _cached_moments(bundle: ModelBundle, module_names: Sequence[str], captions: list[str],
                    batch_size: int, cache: TensorCache, progress: bool,
                    ) -> dict[str, tuple[torch.Tensor, int]]:
    """Per module: (C, token count), from the cache where possible. An entry without its token
    count (written before counts were kept) is recomputed: subtracting needs the count."""
    corpus = corpus_hash(captions)
    models = {n: encoder_fingerprint(bundle, n) for n in module_names}
    keys = {n: content_key(model=models[n], module=n, corpus=corpus, samples=len(captions))
            for n in module_names}
    result: dict[str, tuple[torch.Tensor, int]] = {}
    for name, key in keys.items():
        entry = cache.load(key)
        if entry is not None and "tokens" in entry[1]:
            _check(name, entry[0]["second_moment"], entry[1], bundle, bundle.module(name).in_features)
            result[name] = entry[0]["second_moment"], int(entry[1]["tokens"])
    missing = [n for n in module_names if n not in result]
    if missing:
        log.info("computing statistics for %d modules over %d captions", len(missing), len(captions))
        fresh = _accumulate(bundle, missing, captions, batch_size, progress)
        for name, (matrix, tokens) in fresh.items():
            cache.save(keys[name], {"second_moment": matrix},
                       {"fingerprint": models[name], "module": name, "corpus": corpus,
                        "samples": len(captions), "tokens": str(tokens)})
            result[name] = matrix, tokens
    return result


def neighbour_captions(bundle: ModelBundle, captions: Sequence[str], names: Sequence[str],
                       common: float = 0.02) -> list[str]:
    """The captions that share a word piece with one of ``names`` (the first encoder's
    tokenizer), word pieces found in more than ``common`` of the captions ("a", "photo of")
    left out: where the keys of other concepts lie next to the named ones'."""
    tokenizer = bundle.slots()[0].tokenizer
    pieces = [set(ids) for ids in tokenizer(list(captions), add_special_tokens=False)["input_ids"]]
    counts: dict[int, int] = {}
    for found in pieces:
        for piece in found:
            counts[piece] = counts.get(piece, 0) + 1
    named = {piece for ids in tokenizer(list(names), add_special_tokens=False)["input_ids"] for piece in ids
             if counts.get(piece, 0) <= max(common * len(captions), 1)}
    return [caption for caption, found in zip(captions, pieces, strict=True) if found & named]


def _kept_sums(bundle: ModelBundle, module_names: list[str], captions: list[str], kept: list[str],
               named: list[str], batch_size: int, cache: TensorCache, progress: bool,
               ) -> dict[str, tuple[torch.Tensor, int]]:
    """Per module: (float64 sum of k k^T over ``kept``, its tokens): the cached totals of the
    whole corpus less the ``named`` captions' sums, or the kept ones summed where fewer stay."""
    if len(named) >= len(kept):
        return _sums(bundle, module_names, kept, batch_size, progress)
    whole = _cached_moments(bundle, module_names, captions, batch_size, cache, progress)
    left_out = _sums(bundle, module_names, named, batch_size, progress) if named else {}
    result = {}
    for name in module_names:
        moment, tokens = whole[name]
        named_sum, named_tokens = left_out.get(name, (0.0, 0))
        result[name] = moment.double() * tokens - named_sum, tokens - named_tokens
    return result


def _moments_without(bundle: ModelBundle, module_names: list[str], captions: list[str],
                     names: Sequence[str], batch_size: int, cache: TensorCache, progress: bool,
                     neighbours: Sequence[str] = (), neighbour_weight: float = 1.0,
                     ) -> dict[str, torch.Tensor]:
    """C over the captions that name none of ``names``, plus ``neighbour_weight - 1`` times
    the sums of those that share a word piece with one of ``neighbours`` over the same token
    count (their directions weigh more, the others' no less). A new set of names costs only
    their captions' encoder passes. Not cached itself."""
    kept, named = split_captions(captions, names)
    log.info("statistics: %d of %d captions name no edited source", len(kept), len(captions))
    if not kept:
        raise OptionError("stats_without_sources: every statistics caption names an edited source; "
                          "give a corpus with other captions (--corpus)")
    sums = _kept_sums(bundle, module_names, captions, kept, named, batch_size, cache, progress)
    near = neighbour_captions(bundle, kept, neighbours) if neighbours and neighbour_weight != 1.0 else []
    if near:
        log.info("statistics: %d captions share a word piece with an edited source, weighed %g",
                 len(near), neighbour_weight)
        extra = _sums(bundle, module_names, near, batch_size, progress)
        more = neighbour_weight - 1  # added, not averaged in: the other captions keep their weight
        sums = {n: (total + more * extra[n][0], tokens) for n, (total, tokens) in sums.items()}
    return {n: (total / tokens).float() for n, (total, tokens) in sums.items()}


def second_moments(
    bundle: ModelBundle,
    module_names: Sequence[str],
    captions: Sequence[str] | None = None,
    sample_count: int = DEFAULT_SAMPLES,
    batch_size: int = 256,
    cache: TensorCache | None = None,
    progress: bool = True,
    without: Sequence[str] = (),
    neighbours: Sequence[str] = (),
    neighbour_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """C = E[k k^T] of each module's input, from the cache where possible; with ``without``,
    over the captions (of the first ``sample_count``) that name none of those names; with
    ``neighbours`` and a ``neighbour_weight`` other than 1, the captions that share a word piece
    with one of those names count that many times."""
    captions = list(captions) if captions is not None else default_corpus(bundle, sample_count)
    captions = captions[:sample_count]
    cache = cache or TensorCache("stats")
    if without or (neighbours and neighbour_weight != 1.0):
        return _moments_without(bundle, list(module_names), captions, without, batch_size, cache,
                                progress, neighbours, neighbour_weight)
    return {n: m for n, (m, _) in _cached_moments(bundle, module_names, captions, batch_size, cache,
                                                   progress).items()}
