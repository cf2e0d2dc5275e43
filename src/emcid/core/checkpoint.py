"""Refuse a checkpoint whose weight files do not hold exactly the model's weights.

transformers fills a weight missing from its file with random values, and diffusers leaves it
unallocated; either way the model would run, or fail later, as something else than what was
saved. The text encoders of a local folder are loaded here with transformers' own account of
what it matched (after its key renames and ignore lists, so an older file's
``text_model.`` prefix or ``position_ids`` passes); the diffusers components are checked for
weights left unallocated. Each refusal names the file and the keys.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError
from .family import COMPONENTS

SHOWN = 5  # keys named in the message
INCOMPLETE = "the checkpoint is incomplete; save it again or download it again"


def _named(keys: set[str]) -> str:
    shown = sorted(keys)[:SHOWN]
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(shown) + more


def _check_info(folder: Path, info: dict) -> None:
    missing, unexpected = set(info.get("missing_keys", ())), set(info.get("unexpected_keys", ()))
    mismatched = {str(entry[0]) if isinstance(entry, tuple) else str(entry)
                  for entry in info.get("mismatched_keys", ())}
    if missing:
        raise ModelLoadError(f"{folder} lacks {len(missing)} weight(s) of the model "
                             f"({_named(missing)}): {INCOMPLETE}")
    if unexpected or mismatched:
        extra = unexpected | mismatched
        raise ModelLoadError(f"{folder} holds {len(extra)} weight(s) the model's config does not "
                             f"have or shapes it ({_named(extra)}): it belongs to another "
                             "architecture or config")


def load_text_encoders(folder: Path, index: dict, dtype: torch.dtype, allow_pickle: bool,
                       skip: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """The transformers components of a local pipeline folder (``index``: its
    ``model_index.json``), each checked against its file."""
    import transformers

    components = {}
    for name in COMPONENTS:
        library, class_name = (index.get(name) or [None, None])[:2]
        if library != "transformers" or name in skip or not (folder / name).is_dir():
            continue
        model_class = getattr(transformers, class_name, None)
        if model_class is None:
            continue  # diffusers reports a class it cannot build
        model, info = model_class.from_pretrained(
            folder / name, dtype=dtype, use_safetensors=None if allow_pickle else True,
            output_loading_info=True)
        _check_info(folder / name, info)
        components[name] = model
    return components


def check_allocated(pipeline, folder: Path | None) -> None:
    """diffusers leaves a weight its file lacks on the meta device (no data): refuse it."""
    for name in COMPONENTS:
        module = getattr(pipeline, name, None)
        if not isinstance(module, nn.Module):
            continue
        empty = {key for key, tensor in module.state_dict().items() if tensor.is_meta}
        if empty:
            where = folder / name if folder is not None else f"the {name} weights"
            raise ModelLoadError(f"{where} lacks {len(empty)} weight(s) of the model "
                                 f"({_named(empty)}): {INCOMPLETE}")
