"""A patch written out: as a full pipeline folder with its patch chain (:func:`save_pipeline`),
or as a LoRA of its text-encoder deltas (:func:`export_lora`).

LoRA: each ``fc2`` delta ``D`` (d_out x d_in) becomes ``up @ down`` from its SVD, with the same
rank ``r`` in every module and alpha = ``r`` (scale 1), so a loader adds exactly ``D`` at
weight 1. A rank below a delta's rank keeps its top singular directions; the fraction of
``||D||_F^2`` kept is reported per module. Three key layouts (:data:`FORMATS`):

- ``kohya`` (default): ``lora_te_text_model_encoder_layers_N_mlp_fc2.lora_up.weight`` /
  ``.lora_down.weight`` / ``.alpha`` (SDXL: ``lora_te1_`` / ``lora_te2_``), the names A1111's
  Lora extension, kohya sd-scripts, ComfyUI and diffusers' ``load_lora_weights`` all match;
- ``diffusers``: diffusers' own text-encoder names
  (``text_encoder.text_model.encoder.layers.N.mlp.fc2.lora_linear_layer.up.weight``);
- ``diff``: the kohya module names with one dense ``.diff`` key each, the full delta, exact
  whatever the patch's rank (A1111 and ComfyUI load it; sd-scripts and diffusers do not).

Every file carries kohya's ``ss_*`` metadata (A1111 reads the base model from it) and emcid's
(``emcid_base_fingerprint``, ``emcid_family``, ``emcid_rank``, ``emcid_kept_energy``,
``emcid_sources``), all strings, keys sorted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.bundle import ModelBundle
from ..core.cache import write_safetensors
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
FORMATS = ("kohya", "diffusers", "diff")
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default file name
# diffusers' text-encoder LoRA layout; it converts these to PEFT's lora_B / lora_A on loading.
# (diffusers 0.42 cannot load an fc2-only file written with PEFT's names: its PEFT -> diffusers
# key map knows only the attention projections, so such a file fails type detection.)
UP, DOWN = "lora_linear_layer.up.weight", "lora_linear_layer.down.weight"
# kohya's module-name prefix per text encoder: sd-scripts names a lone encoder lora_te and
# SDXL's two lora_te1 / lora_te2; A1111 and ComfyUI match the same names.
KOHYA_PREFIXES = {"sd1": {"text_encoder": "lora_te"}, "sd2": {"text_encoder": "lora_te"},
                  "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}
# kohya's ss_base_model_version values; A1111 reads the model family from it and ss_v2.
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


@dataclass
class LoraExport:
    """What was (or would be) written: the file's tensors and metadata, each delta's kept energy."""

    family: str
    format: str
    rank: int
    patch_rank: int
    tensors: dict[str, torch.Tensor]  # the keys as they are in the file
    metadata: dict[str, str]  # the file's safetensors metadata, keys sorted
    kept_energy: dict[str, float]  # module name -> fraction of ||delta||_F^2 the file keeps

    @property
    def exact(self) -> bool:
        return self.rank >= self.patch_rank


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


def _check_format(format: str, rank: int | None) -> None:
    """Refused before any work: a diff file holds full deltas, so a rank would be ignored."""
    if format not in FORMATS:
        raise LoraExportError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    if format == "diff" and rank is not None:
        raise LoraExportError(f"--rank {rank}: --format diff writes each delta in full, at no rank")


def _kept(s: torch.Tensor, rank: int) -> float:
    total = float(s.pow(2).sum())
    return 1.0 if total == 0 else float(s[:rank].pow(2).sum()) / total


def kohya_module(name: str, family: str) -> str:
    """kohya's name of a text-encoder module: the encoder's prefix, then its path with '_' for '.'.

    (diffusers' ``convert_state_dict_to_kohya`` is not used: it names every first encoder
    ``lora_te1``, SDXL's name, where SD 1.x/2.x files need ``lora_te``; it takes PEFT keys only
    and writes no ``.diff`` keys. Its renaming is this line.)
    """
    component, _, path = name.partition(".")
    return f"{KOHYA_PREFIXES[family][component]}_{path.replace('.', '_')}"


def _factors(dense: dict[str, torch.Tensor], rank: int | None,
             ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float], int, int]:
    """Rank-``rank`` SVD factors ``(up, down)`` per module, the energy each keeps, the rank
    chosen and the patch's rank (the largest numerical rank of its deltas)."""
    width = min(min(d.shape) for d in dense.values())
    if rank is not None and not 1 <= rank <= width:
        raise LoraExportError(
            f"--rank {rank}: choose from 1 to {width} (the narrowest edited module's width)")
    decomposed = {name: svd_rank(delta) for name, delta in dense.items()}
    patch_rank = max(max(r for *_, r in decomposed.values()), 1)
    chosen = patch_rank if rank is None else min(rank, patch_rank)
    factors, kept = {}, {}
    for name, (u, s, vh, _) in decomposed.items():
        root = s[:chosen].sqrt()
        factors[name] = ((u[:, :chosen] * root).float().contiguous(),
                         (root.unsqueeze(1) * vh[:chosen]).float().contiguous())
        kept[name] = _kept(s, chosen)
    return factors, kept, chosen, patch_rank


def _kohya_tensors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], family: str,
                   ) -> dict[str, torch.Tensor]:
    """``lora_up``/``lora_down`` and ``alpha`` = rank (a 0-dim tensor), so alpha / rank = 1."""
    tensors = {}
    for name, (up, down) in factors.items():
        module = kohya_module(name, family)
        tensors[f"{module}.lora_up.weight"] = up
        tensors[f"{module}.lora_down.weight"] = down
        tensors[f"{module}.alpha"] = torch.tensor(float(up.shape[1]))
    return tensors


def _diffusers_tensors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The layout diffusers' ``save_lora_weights`` writes: component prefix, module path, UP/DOWN."""
    tensors = {}
    for name, (up, down) in factors.items():
        tensors[f"{name}.{UP}"] = up
        tensors[f"{name}.{DOWN}"] = down
    return tensors


def _metadata(patch: EditPatch, family: str, rank: int, kept: dict[str, float]) -> dict[str, str]:
    """kohya's ``ss_*`` keys that A1111 reads (the family, the network's dim and alpha) and emcid's."""
    metadata = {
        "ss_base_model_version": BASE_MODEL_VERSIONS[family], "ss_v2": str(family == "sd2"),
        "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
        "ss_network_module": "networks.lora", "format": "pt",
        "emcid_family": family, "emcid_rank": str(rank),
        "emcid_kept_energy": json.dumps(kept, sort_keys=True),
        "emcid_sources": json.dumps(patch.sources),
    }
    if patch.base_fingerprint is not None:  # unknown for patches made elsewhere
        metadata["emcid_base_fingerprint"] = patch.base_fingerprint
    return dict(sorted(metadata.items()))


def lora_from_patch(patch: EditPatch, rank: int | None = None, format: str = "kohya") -> LoraExport:
    """The patch's text-encoder deltas as a LoRA in ``format`` (:data:`FORMATS`).

    ``kohya`` and ``diffusers`` hold rank-``rank`` factors (default: the patch's rank); ``diff``
    holds each delta in full. Raises :class:`LoraExportError` for an unknown format, a rank
    below 1 or above a module's width (or any rank with ``diff``), and for patches with
    deltas outside the text encoders of their model family.
    """
    _check_format(format, rank)
    family = _family(patch)
    _check_modules(patch, family)
    dense = {name: delta.dense() for name, delta in patch.deltas.items()}
    factors, kept, chosen, patch_rank = _factors(dense, rank)
    if format == "diff":
        chosen, kept = patch_rank, dict.fromkeys(dense, 1.0)
        tensors = {f"{kohya_module(n, family)}.diff": d.float().contiguous() for n, d in dense.items()}
    else:
        tensors = _kohya_tensors(factors, family) if format == "kohya" else _diffusers_tensors(factors)
    return LoraExport(family, format, chosen, patch_rank, tensors,
                      _metadata(patch, family, chosen, kept), kept)


def export_lora(patch: EditPatch | str | os.PathLike, out: str | os.PathLike,
                rank: int | None = None, format: str = "kohya") -> LoraExport:
    """Write the patch's text-encoder deltas as a LoRA file (see :func:`lora_from_patch`).

    ``out`` is a ``.safetensors`` file, or a folder that receives diffusers' default file name
    (so ``pipe.load_lora_weights(folder)`` finds it). It is written whole or not at all, with
    its header's keys sorted (the same patch gives the same bytes); nothing is written if the
    patch, the format or the rank is refused.
    """
    if not isinstance(patch, EditPatch):
        patch = EditPatch.load(patch)
    export = lora_from_patch(patch, rank, format)
    out = Path(out)
    path = out if out.suffix == ".safetensors" else out / DEFAULT_WEIGHT_NAME
    write_safetensors(path, export.tensors, export.metadata)
    return export
