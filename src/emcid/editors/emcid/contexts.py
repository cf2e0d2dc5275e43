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
"""

from __future__ import annotations

import random
from functools import lru_cache

from ...core.bundle import ModelBundle

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


def style_context_prompts(bundle: ModelBundle, source: str, count: int) -> tuple[str, ...]:
    """``count`` templates "<caption> in the style of {}" for ``source``, the same on every call."""
    if count == 0:
        return ()
    captions = _captions(bundle.is_embedded)
    chosen = random.Random(f"style-contexts-{source}").sample(captions, count)
    return tuple(STYLE_CONTEXT.format(c.replace("{", "{{").replace("}", "}}")) for c in chosen)
