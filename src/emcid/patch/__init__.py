"""Patches: the file format (:mod:`.format`: :class:`EditPatch`, its checksum) and what a patch
is written out as (:mod:`.export`: a pipeline folder, a LoRA). The chain of patches a model
carries (history, revert, base weights) is :mod:`emcid.core.chain`, re-exported here."""

from ..core.chain import base_weights, chain_checksums, chain_record, revert_last
from .export import LoraExport, export_lora, lora_from_patch, save_pipeline
from .format import PARTS, PICKLE_MAGIC, RANK_RTOL, DeltaWeight, EditPatch, svd_rank

__all__ = ["PARTS", "PICKLE_MAGIC", "RANK_RTOL", "DeltaWeight", "EditPatch", "LoraExport", "base_weights",
           "chain_checksums", "chain_record", "export_lora", "lora_from_patch", "revert_last",
           "save_pipeline", "svd_rank"]
