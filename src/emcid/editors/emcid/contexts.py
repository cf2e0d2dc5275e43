"""Style contexts: the prompts users write for a style name an object before it.

The artist task's release prompts name the style alone ("painting by X"). Users write "a
house in the style of X", where X's token follows a caption, and its fc2 keys there differ
from the ones after "painting by": on the embedded world an erasure written at the release
prompts alone reaches 0.96 of the styles named alone and none of the objects drawn in them
(docs/method.md, "Style contexts"). ``style_contexts=K`` adds K prompts "<caption> in the style
of X" to each request that takes the task's default prompts; Stage I distils the destination
on them too, and Stage II writes their keys. Captions come from the model's object captions
(the embedded world's own, else the built-in ImageNet corpus), chosen per source by a seeded
draw, so a request's prompts depend only on its source and K.

``written_contexts=M`` adds M more such prompts after Stage I, for Stage II alone: each one's
target is its own unedited block-l* state plus the concept's Stage I delta. Stage I's work
per concept stays that of its own prompts, while Stage II writes the style's keys in more of
the contexts users put it in (docs/method.md, "Style contexts").
"""

from __future__ import annotations

import random
from dataclasses import replace
from functools import lru_cache

import torch

from ...core.bundle import ModelBundle
from ...core.tokens import subject_positions
from .stage1.start import states_at
from .targets import ConceptTarget

STYLE_CONTEXT = "{} in the style of {{}}"
#: How many object captions the draw chooses from.
CAPTION_POOL = 2000


@lru_cache(maxsize=2)
def _captions(embedded: bool) -> tuple[str, ...]:
    if embedded:
        from ...mini.world import caption_corpus

        return tuple(caption_corpus(CAPTION_POOL, seed=1))
    from ...concepts import builtin_caption_corpus

    return tuple(builtin_caption_corpus(CAPTION_POOL, seed=1))


def _templates(captions: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    return tuple(STYLE_CONTEXT.format(c.replace("{", "{{").replace("}", "}}")) for c in captions)


def style_context_prompts(bundle: ModelBundle, source: str, count: int) -> tuple[str, ...]:
    """``count`` templates "<caption> in the style of {}" for ``source``, the same on every call."""
    if count == 0:
        return ()
    return _templates(random.Random(f"style-contexts-{source}").sample(_captions(bundle.is_embedded), count))


def written_context_prompts(bundle: ModelBundle, source: str, count: int,
                            taken: tuple[str, ...]) -> tuple[str, ...]:
    """``count`` more such templates for ``source``, none of them among ``taken`` (its prompts)."""
    if count == 0:
        return ()
    free = [t for t in _templates(_captions(bundle.is_embedded)) if t not in taken]
    return tuple(random.Random(f"written-contexts-{source}").sample(free, count))


def with_written_contexts(bundle: ModelBundle, targets: list[ConceptTarget],
                          prompts: list[tuple[str, ...]]) -> list[ConceptTarget]:
    """Each target with its ``prompts`` added after its own: their targets are their unedited
    block-l* states at the subject plus the concept's delta (what Stage II writes). All the
    added prompts are encoded together, one pass per text encoder."""
    chosen = [i for i, added in enumerate(prompts) if added]
    if not chosen:
        return list(targets)
    found = list(targets)
    for name, layer in targets[chosen[0]].z_layer.items():
        tokenizer = bundle.slot(name).tokenizer
        sources = [targets[i].request.source for i in chosen]
        texts = [p.format(source) for i, source in zip(chosen, sources) for p in prompts[i]]
        positions = torch.cat([subject_positions(tokenizer, prompts[i], source)
                               for i, source in zip(chosen, sources)])
        states = states_at(bundle, name, layer, texts, positions).split([len(prompts[i]) for i in chosen])
        for i, added in zip(chosen, states):
            hidden = dict(found[i].source_hidden)
            hidden[name] = torch.cat([hidden[name], added.to(hidden[name])])
            found[i] = replace(found[i], source_hidden=hidden)
    for i in chosen:
        request = found[i].request
        found[i] = replace(found[i], request=replace(request, prompts=request.prompts + prompts[i]))
    return found
