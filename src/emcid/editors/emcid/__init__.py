"""EMCID: Stage I (per-concept targets) followed by Stage II (one multi-layer closed form)."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

from ...concepts import OBJECT_PROMPTS
from ...core.bundle import ModelBundle
from ...core.cache import TensorCache
from ...core.chain import adopt_stage1, base_weights, chain_checksums, edited_requests
from ...core.config import check_corpus
from ...core.stats import read_corpus, second_moments
from ...core.weights import current_weights
from ...errors import OptionError
from ...requests.edit import EditRequest
from ..base import ConfiguredEditor
from ..presets import PROFILES, preset_options, resolve_layers
from .config import STAGE1_KEYS, STAGE2_KEYS, EMCIDConfig, Stage1Config, Stage2Config
from .contexts import style_context_prompts, with_written_contexts, written_context_prompts
from .replay import chain_difference, earlier_requests, replay_problem
from .stage1 import compute_targets
from .stage1.objective import check_timesteps
from .stage1.report import unconverged
from .stage2 import compute_deltas, held_destinations, preservation_weight

__all__ = ["STAGE1_KEYS", "STAGE2_KEYS", "EMCIDConfig", "EMCIDEditor", "MEMITEditor", "Stage1Config",
           "Stage2Config", "compute_deltas", "compute_targets", "distributed_state"]

log = logging.getLogger(__name__)


def distributed_state():
    """accelerate's process state when launched on several processes (``accelerate launch``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None  # single process: skip importing accelerate
    import torch
    from accelerate import PartialState

    # Without cpu=True accelerate sees no distributed setup on a machine without CUDA, and
    # every process would run all of Stage I.
    return PartialState(cpu=not torch.cuda.is_available())


class EMCIDEditor(ConfiguredEditor):
    name = "emcid"
    config_class = EMCIDConfig
    runtime_options = frozenset({"cache", "cache_root", "concept_batch", "cpu_concept_batch",
                                 "precision", "grad_checkpointing", "cuda_graphs",
                                 "checkpoint_every"})

    @classmethod
    def flat_options(cls, options: dict) -> dict:
        return EMCIDConfig.flatten(options)

    @classmethod
    def presets(cls, bundle: ModelBundle | None, task: str, options: dict) -> dict:
        """A profile's values win over the task's presets (the caller's must agree with it)."""
        found = cls.flat_options(super().presets(bundle, task, options))
        profile = PROFILES.get(cls.flat_options(options).get("profile", found.get("profile")))
        return {k: v for k, v in found.items() if profile is None or k not in profile.options}

    def check(self, bundle: ModelBundle) -> None:
        layers = self.layers_for(bundle)
        check_corpus(self.config.corpus)
        check_timesteps(bundle, replace(self.config.stage1, **self.config.reference_stage1))
        check_timesteps(bundle, self.config.stage1)
        if self.replays(bundle):
            problem = replay_problem(bundle, self.name, self.task, set(self.fc2_names(bundle, layers)))
            if problem:
                raise OptionError(f"earlier_edits='replay' re-solves the patches this model carries, "
                                  f"but {problem}: use earlier_edits='hold'")
        profile = PROFILES.get(self.config.profile)
        if profile is not None and bundle.family not in profile.families:
            raise OptionError(f"profile {self.config.profile!r} is exact for {', '.join(profile.families)} "
                              f"models, not {bundle.family}: {profile.why}")

    def prepare(self, requests: list[EditRequest], bundle: ModelBundle) -> list[EditRequest]:
        """Requests that kept the object prompts, or gave the task's own, take the task's
        default prompts and, with ``style_contexts``, that many "<caption> in the style of X"
        prompts after them (contexts.py)."""
        if not self.config.default_prompts:
            return requests
        prompts, count = tuple(self.config.default_prompts), self.config.style_contexts
        return [replace(r, prompts=prompts + style_context_prompts(bundle, r.source, count))
                if r.prompts in (OBJECT_PROMPTS, prompts) else r for r in requests]

    def written_contexts(self, bundle: ModelBundle, targets: list) -> list:
        """Targets of requests that took the task's default prompts, with ``written_contexts``
        more style contexts for Stage II alone (contexts.py)."""
        count = self.config.written_contexts
        if not count or not self.config.default_prompts:
            return targets
        defaults = tuple(self.config.default_prompts)
        added = []
        for target in targets:
            source, prompts = target.request.source, target.request.prompts
            taken = defaults + style_context_prompts(bundle, source, self.config.style_contexts)
            added.append(written_context_prompts(bundle, source, count, taken) if prompts == taken else ())
        return with_written_contexts(bundle, targets, added)

    def layers_for(self, bundle: ModelBundle) -> dict[str, list[int]]:
        """Edited block indices per encoder; refuses encoders or blocks the model lacks."""
        spec = self.config.layers
        if spec is None:  # created without the model: its family's rows for this task
            spec = preset_options(self.methods(), bundle, self.task)["layers"]
        names = [s.name for s in bundle.slots()]
        layers = {}
        for slot_name, given in spec.items():
            if slot_name not in names:
                raise OptionError(f"layers: this {bundle.family} model has no {slot_name!r}; "
                                  f"it has {', '.join(names)}")
            depth = bundle.slot(slot_name).num_layers
            indices = resolve_layers(given, depth)
            if not indices or any(not 0 <= i < depth - 1 for i in indices):
                raise OptionError(
                    f"layers {given} of {slot_name}: choose from 0..{depth - 2} (the last "
                    "block is never edited)"
                )
            layers[slot_name] = sorted(set(indices))
        return layers

    def replays(self, bundle: ModelBundle) -> bool:
        """Whether this batch re-solves the chain the model carries (``earlier_edits="replay"``)."""
        return self.config.stage2.earlier_edits == "replay" and bool(chain_checksums(bundle))

    def compute(self, bundle: ModelBundle, requests: list[EditRequest], progress: bool) -> dict:
        layers = self.layers_for(bundle)
        self._replayed = self._keys = None
        if not self.replays(bundle):
            return self.solve(bundle, requests, layers, progress)
        earlier = earlier_requests(bundle, requests)
        log.info("earlier_edits=replay: the chain's %d earlier requests solved on the base model "
                 "with these %d", len(earlier), len(requests))
        if self.runtime.cache and (adopted := adopt_stage1(bundle, self.cache("stage1"))):
            log.info("earlier_edits=replay: %d Stage I targets read from the chain's folder", adopted)
        names = self.fc2_names(bundle, layers)
        with base_weights(bundle):
            base = current_weights(bundle, names)
            solved = self.solve(bundle, earlier + requests, layers, progress)
        self._replayed = len(earlier)
        if self._steps is not None:
            self._steps = self._steps[len(earlier):]
        if self._unconverged is not None:
            now = {r.source for r in requests}
            self._unconverged = [source for source in self._unconverged if source in now]
        return chain_difference(solved, base, current_weights(bundle, names))

    def solve(self, bundle: ModelBundle, requests: list[EditRequest], layers: dict[str, list[int]],
              progress: bool) -> dict:
        """Stage I and Stage II for ``requests`` on the model as it is."""
        found = self.stage1_targets(bundle, requests, layers, progress)
        self._keys = [t.key for t in found]  # every target solved, replayed ones included
        targets = self.written_contexts(bundle, found)
        self._steps = [t.steps for t in targets]
        # None: the stopping rule was off for every request (nothing to report)
        self._unconverged = [t.request.source for t in unconverged(targets)] \
            if any(t.converged is not None for t in targets) else None
        moments = self.second_moments(bundle, layers, progress, [r.source for r in requests])
        protected = self.protected_requests(bundle, requests)
        # the earlier batches' destinations too, so that a held chain still solves one batch
        held = held_destinations([*protected, *requests]) if self.config.stage2.destinations == "keep" else []
        self._lam = preservation_weight(self.config.stage2, len(targets), len(protected))
        return compute_deltas(bundle, targets, layers, moments, self.config.stage2, progress=progress,
                              protected=protected, cache=self.cache("eigen"), destinations=held)

    def report(self) -> dict:
        """The Stage I steps each request's target took (the stopping rule's, or all) and,
        where the rule was on, the sources of those it never stopped (``stage1_unconverged``,
        in the requests' order): their delta had not settled; and the preservation weight
        Stage II used (``stage2_lam``: lam as ``lam_edits`` scaled it for this batch); in a
        replayed chain, how many of the chain's requests were solved again with this batch's
        (``stage2_replayed``); and the Stage I cache keys of every target solved
        (``stage1_keys``), whose entries a chain folder keeps (``emcid_history/stage1``)."""
        steps = getattr(self, "_steps", None)
        found = {"stage1_steps": steps} if steps and None not in steps else {}
        if getattr(self, "_unconverged", None) is not None:
            found["stage1_unconverged"] = self._unconverged
        if getattr(self, "_lam", None) is not None:
            found["stage2_lam"] = self._lam
        if getattr(self, "_replayed", None) is not None:
            found["stage2_replayed"] = self._replayed
        keys = getattr(self, "_keys", None)
        if keys and None not in keys:
            found["stage1_keys"] = keys
        return found

    def protected_requests(self, bundle: ModelBundle, requests: list[EditRequest]) -> list[EditRequest]:
        """The concepts earlier patches in the chain edited (not those edited again now): their
        keys stay out of the null space's free space, or are held by the closed form
        (``earlier_edits="hold"``)."""
        stage2 = self.config.stage2
        if (stage2.projection != "nullspace" and stage2.earlier_edits == "free") or self.replays(bundle):
            return []
        now = {r.source.casefold() for r in requests}
        earlier = [EditRequest(data["source"], data.get("destination", ""), tuple(data["prompts"]))
                   for data in edited_requests(bundle)]
        return [r for r in earlier if r.source.casefold() not in now]

    def stage1_targets(self, bundle: ModelBundle, requests: list[EditRequest],
                       layers: dict[str, list[int]], progress: bool) -> list:
        """Stage I for every request (no batch validation: tasks such as debias give the same
        source several destinations on purpose), in the requests' order."""
        z_layer = {slot: max(indices) for slot, indices in layers.items()}
        caches = (self.cache("stage1"), self.cache("images"))
        state = distributed_state()
        if state is not None:
            if not self.runtime.cache:
                raise OptionError("multi-process Stage I shares results through the cache: enable it")
            # Each process computes its share into the shared cache; then all read everything.
            self._stage1(bundle, requests[state.process_index::state.num_processes], z_layer, caches,
                         progress)
            state.wait_for_everyone()
        return self._stage1(bundle, requests, z_layer, caches, progress)

    def second_moments(self, bundle: ModelBundle, layers: dict[str, list[int]],
                       progress: bool, sources: list[str] = ()) -> dict:
        """The preservation statistics of every edited fc2, cached on disk; with
        ``stats_without_sources``, over the captions that name none of ``sources`` (the edited
        ones; in a replayed chain, every concept the chain edits)."""
        config = self.config
        names = self.fc2_names(bundle, layers)
        corpus = read_corpus(Path(config.corpus)) if config.corpus else None
        without = list(sources) if config.stats_without_sources else []
        with base_weights(bundle):  # a patched model's statistics are its base model's
            return second_moments(bundle, names, corpus, config.stats_samples,
                                  cache=self.cache("stats"), progress=progress, without=without,
                                  neighbours=list(sources), neighbour_weight=config.neighbour_weight)

    @staticmethod
    def fc2_names(bundle: ModelBundle, layers: dict[str, list[int]]) -> list[str]:
        """The module names of the edited fc2 weights."""
        return [bundle.slot(s).fc2_name(i) for s, indices in layers.items() for i in indices]

    def _stage1(self, bundle: ModelBundle, requests: list[EditRequest], z_layer: dict[str, int],
                caches: tuple[TensorCache, TensorCache], progress: bool) -> list:
        """Stage I per group of requests sharing a config, returned in the requests' order."""
        groups: dict[str, tuple[Stage1Config, list[int]]] = {}
        for index, request in enumerate(requests):
            config = self.config.stage1_for(request)
            groups.setdefault(repr(config), (config, []))[1].append(index)
        targets: list = [None] * len(requests)
        for config, indices in groups.values():
            chosen = [requests[i] for i in indices]
            found = compute_targets(bundle, chosen, z_layer, config, *caches, progress,
                                    self.runtime)
            for index, target in zip(indices, found, strict=True):
                targets[index] = target
        return targets


class MEMITEditor(EMCIDEditor):
    """MEMIT-style baseline: EMCID's multi-layer Stage II with targets from the text side only
    (pooled-output alignment to the destination; no diffusion distillation, no images; its
    row in ``emcid.editors.presets``)."""

    name = "memit"
    lineage = ("emcid", "memit")
