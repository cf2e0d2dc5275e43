"""A patch written out: as a full pipeline folder with its patch chain (:func:`save_pipeline`),
or as a LoRA of its text-encoder deltas that stock diffusers loads (:func:`export_lora`).

LoRA: each ``fc2`` delta ``D`` (d_out x d_in) becomes ``lora_B @ lora_A`` from its SVD, with the
same rank ``r`` in every module and ``lora_alpha = r`` (scale 1), so ``pipe.load_lora_weights``
adds exactly ``D`` at ``lora_scale=1``. Keys are PEFT's, prefixed by the component
(``text_encoder.text_model.encoder.layers.N.mlp.fc2.lora_A.weight``), written by diffusers'
own ``save_lora_weights``. A rank below a delta's rank keeps its top singular directions;
the fraction of ``||D||_F^2`` kept is reported per module.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.bundle import ModelBundle
from ..core.chain import HISTORY_DIR, base_fingerprint, write_history
from ..core.folders import replace_folder
from ..core.loading import write_settings
from ..errors import LoraExportError, PatchFileError
from .format import EditPatch, svd_rank

ORIGIN_FILE = "origin.json"  # in emcid_history/: the base model a folder emcid wrote is an edit of


def _refuse_overlap(bundle: ModelBundle, folder: Path) -> None:
    source = Path(bundle.source)
    if not source.exists():
        return  # a hub id
    source, target = source.resolve(), folder.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise PatchFileError(f"--out {folder} would overwrite the model {bundle.source}: write "
                             "the edited pipeline to a new folder beside it")


def recorded_base(folder: str | os.PathLike, overwrite: bool = False) -> str | None:
    """The base model fingerprint a pipeline folder that emcid wrote records; None for a new or
    empty folder, or with ``overwrite``. Any other folder is refused, so a pipeline the user
    made or downloaded is never replaced by mistake."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    if not (folder / "model_index.json").exists():
        raise PatchFileError(f"--out {folder} exists and is not a pipeline folder: choose a new folder")
    if overwrite:
        return None
    origin = folder / HISTORY_DIR / ORIGIN_FILE
    try:
        return json.loads(origin.read_text())["base_fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        raise PatchFileError(f"--out {folder} holds a pipeline that emcid did not write (it has no "
                             f"{HISTORY_DIR}/{ORIGIN_FILE}): choose a new folder, or pass "
                             "--overwrite to replace it") from None


def save_pipeline(bundle: ModelBundle, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save the (patched) pipeline with ``save_pretrained``, emcid's settings and patch chain.

    Refuses to write over (or into) the folder the model came from, and to replace a pipeline
    folder unless emcid wrote it from the same base model (or ``overwrite``). The folder is
    written beside its final place and swapped into it, so an interrupted save leaves no half
    model. The chain records every patch the model carries, so
    :func:`~emcid.core.chain.revert_last` can take them off one at a time, last first, bit
    for bit.
    """
    folder = Path(folder)
    _refuse_overlap(bundle, folder)
    recorded, base = recorded_base(folder, overwrite), base_fingerprint(bundle)
    if recorded is not None and recorded != base:
        raise PatchFileError(f"--out {folder} holds an edit of another base model ({recorded[:12]}, "
                             f"this one is {base[:12]}): choose a new folder, or pass --overwrite")

    def write(tmp: Path) -> None:
        bundle.pipeline.save_pretrained(tmp, safe_serialization=True)
        write_settings(bundle, tmp)
        write_history(bundle, tmp)
        (tmp / HISTORY_DIR).mkdir(exist_ok=True)
        (tmp / HISTORY_DIR / ORIGIN_FILE).write_text(json.dumps({"base_fingerprint": base}) + "\n")

    return replace_folder(folder, write)


# Linear layers of a CLIP text encoder that diffusers maps to LoRA ranks when it loads one.
LORA_SUFFIXES = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")
FAMILY_SLOTS = {"sd1": ("text_encoder",), "sd2": ("text_encoder",),
                "sdxl": ("text_encoder", "text_encoder_2")}
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default file name
# diffusers' text-encoder LoRA layout; it converts these to PEFT's lora_B / lora_A on loading.
# (diffusers 0.42 cannot load an fc2-only file written with PEFT's names: its PEFT -> diffusers
# key map knows only the attention projections, so such a file fails type detection.)
UP, DOWN = "lora_linear_layer.up.weight", "lora_linear_layer.down.weight"


@dataclass
class LoraExport:
    """What was (or would be) written: state dict per component and each delta's kept energy."""

    family: str
    rank: int
    patch_rank: int
    layers: dict[str, dict[str, torch.Tensor]]  # component -> PEFT keys without the prefix
    kept_energy: dict[str, float]  # module name -> fraction of ||delta||_F^2 the LoRA keeps

    @property
    def exact(self) -> bool:
        return self.rank >= self.patch_rank

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The keys as they are in the file (component prefix included)."""
        return {f"{c}.{k}": v for c, layers in self.layers.items() for k, v in layers.items()}


def _family(patch: EditPatch) -> str:
    family = patch.metadata.get("family")
    if family is None:  # patches from elsewhere: SDXL is the family with a second encoder
        family = "sdxl" if any(n.startswith("text_encoder_2.") for n in patch.deltas) else "sd1"
    if family not in FAMILY_SLOTS:
        raise LoraExportError(f"--patch: unknown model family {family!r} in the patch's metadata")
    return family


def _check_modules(patch: EditPatch, family: str) -> None:
    """Every delta must sit in a text-encoder Linear layer that the family's pipeline has."""
    if not patch.deltas:
        raise LoraExportError("--patch: the patch holds no deltas")
    slots = FAMILY_SLOTS[family]
    outside = sorted(n for n in patch.deltas if n.partition(".")[0] not in slots)
    if len(outside) == len(patch.deltas):
        raise LoraExportError(
            f"--patch edits no text-encoder module (it edits {outside[0]} ...): only text-encoder "
            "deltas export as a LoRA; use `emcid apply` to write the full edited pipeline")
    if outside:
        raise LoraExportError(
            f"--patch edits {outside[0]}, which a {family} pipeline's text encoders "
            f"({', '.join(slots)}) do not hold; a LoRA of the rest would lose part of the edit")
    odd = sorted(n for n in patch.deltas if not n.endswith(LORA_SUFFIXES))
    if odd:
        raise LoraExportError(f"--patch: {odd[0]} is not a Linear layer diffusers loads LoRA weights into")


def _kept(s: torch.Tensor, rank: int) -> float:
    total = float(s.pow(2).sum())
    return 1.0 if total == 0 else float(s[:rank].pow(2).sum()) / total


def lora_from_patch(patch: EditPatch, rank: int | None = None) -> LoraExport:
    """The patch's text-encoder deltas as rank-``rank`` LoRA factors (default: the patch's rank).

    Raises :class:`LoraExportError` for a rank below 1 or above a module's width, and for
    patches with deltas outside the text encoders of their model family.
    """
    family = _family(patch)
    _check_modules(patch, family)
    dense = {name: delta.dense() for name, delta in patch.deltas.items()}
    width = min(min(d.shape) for d in dense.values())
    if rank is not None and not 1 <= rank <= width:
        raise LoraExportError(
            f"--rank {rank}: choose from 1 to {width} (the narrowest edited module's width)")
    decomposed = {name: svd_rank(delta) for name, delta in dense.items()}
    patch_rank = max(max(r for *_, r in decomposed.values()), 1)
    chosen = patch_rank if rank is None else min(rank, patch_rank)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    kept: dict[str, float] = {}
    for name, (u, s, vh, _) in decomposed.items():
        component, _, module = name.partition(".")
        root = s[:chosen].sqrt()
        layers.setdefault(component, {})[f"{module}.{UP}"] = (u[:, :chosen] * root).float().contiguous()
        layers[component][f"{module}.{DOWN}"] = (root.unsqueeze(1) * vh[:chosen]).float().contiguous()
        kept[name] = _kept(s, chosen)
    return LoraExport(family, chosen, patch_rank, layers, kept)


def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def export_lora(patch: EditPatch | str | os.PathLike, out: str | os.PathLike,
                rank: int | None = None) -> LoraExport:
    """Write the patch's text-encoder deltas as a diffusers LoRA file (``pipe.load_lora_weights``).

    ``out`` is a ``.safetensors`` file, or a folder that receives diffusers' default file name.
    Nothing is written if the patch or the rank is refused.
    """
    if not isinstance(patch, EditPatch):
        patch = EditPatch.load(patch)
    export = lora_from_patch(patch, rank)
    out = Path(out)
    is_file = out.suffix == ".safetensors"
    folder, weight_name = (out.parent, out.name) if is_file else (out, DEFAULT_WEIGHT_NAME)
    arguments = {f"{component}_lora_layers": layers for component, layers in export.layers.items()}
    _pipeline_class(export.family).save_lora_weights(folder, weight_name=weight_name, **arguments)
    return export
