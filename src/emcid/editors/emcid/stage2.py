"""Stage II: write every Stage I target into several fc2 layers at once (docs/method.md, Stage II).

Per edited block ``l`` (ascending), with keys ``K`` (fc2 inputs at the subject tokens, one
column per concept, the mean over its prompts; with ``keys="prompt"`` one per prompt),
residuals ``R`` and preservation statistics ``C``:

    Delta_l = a R_l K^T (lam (1 - a) C + a K K^T)^{-1}

the minimiser of ``lam (1-a) tr(D C D^T) + a ||(W + D) K - (W K + R_l)||^2``. The residual
is spread over the remaining blocks (``R_l = R / (L - i)``) and recomputed after each
update, so later blocks see the earlier ones. ``R`` per concept, with ``h`` block ``l*``'s
output and ``m^l`` block ``l``'s fc2 output at the subject token of prompt ``j``:

- ``memit`` (default): ``mean_j (h_j + delta - h_j^current)``, one target per prompt;
- ``release`` (the EMCID release): ``h_0 + delta - mean_j m_j^l``, one target per concept,
  formed at its first prompt.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from ...core.bundle import ModelBundle
from ...core.cache import TensorCache
from ...core.hooks import capture, replay_prefix, stop_after
from ...core.stats import names_any
from ...core.tokens import length_groups, subject_positions
from ...core.weights import add_weights, restored
from ...requests.edit import EditRequest
from .config import Stage2Config
from .nullspace import eigen_decomposition, free_space, projected_update
from .solve import closed_form_update
from .targets import ConceptTarget

__all__ = ["Stage2Config", "closed_form_update", "compute_deltas"]


def _prompt_batch(targets: list[ConceptTarget], slot_name: str, bundle: ModelBundle):
    """All source prompts of all concepts, their subject positions and owning concept."""
    return _request_prompts([t.request for t in targets], slot_name, bundle)


def _request_prompts(requests: list[EditRequest], slot_name: str, bundle: ModelBundle):
    """All source prompts of ``requests``, their subject positions and owning request."""
    prompts, positions, owner = [], [], []
    tokenizer = bundle.slot(slot_name).tokenizer
    for i, request in enumerate(requests):
        prompts += request.source_prompts()
        positions.append(subject_positions(tokenizer, request.prompts, request.source))
        owner += [i] * len(request.prompts)
    return prompts, torch.cat(positions), torch.tensor(owner)


def _mean_by_owner(rows: torch.Tensor, owner: torch.Tensor, count: int) -> torch.Tensor:
    """Average rows belonging to the same concept: (count, width)."""
    sums = torch.zeros(count, rows.shape[-1], dtype=torch.float64)
    sums.index_add_(0, owner, rows.double().cpu())
    return sums / torch.bincount(owner, minlength=count).unsqueeze(1)


def _targets(targets: list[ConceptTarget], slot_name: str, form: str) -> torch.Tensor:
    """memit: ``z_j = h_j + delta`` per prompt, (prompts, width); release: the release's one
    ``z = h_0 + delta`` per concept, (concepts, width)."""
    if form == "memit":
        return torch.cat([t.targets(slot_name) for t in targets])
    return torch.stack([t.first_prompt_target(slot_name) for t in targets])


def _residuals(z: torch.Tensor, current: torch.Tensor, owner: torch.Tensor, count: int,
               form: str) -> torch.Tensor:
    """Per concept, (count, width) float64. memit: ``mean_j (z_j - current_j)``; release:
    ``z - mean_j current_j`` (the release averages the outputs, not the differences)."""
    if form == "memit":
        return _mean_by_owner(z - current, owner, count)
    return z.double() - _mean_by_owner(current, owner, count)


class _KeyReader:
    """Reads fc2 keys and a reference output at the subject tokens, layer after layer.

    CLIP text encoders are causal: a token's states depend only on the tokens up to it. Each
    prompt is therefore encoded only up to its subject token, without padding (SD pads to 77
    tokens; subjects sit at about token 5), prompts of equal length stacked together. Layers
    are read in ascending order while earlier ones are updated, so each pass records the
    input of the block it reads; the next pass replays it (nothing before that block has
    changed since) and runs only the blocks from there to the last one it needs.
    """

    def __init__(self, bundle: ModelBundle, slot_name: str, prompts: list[str],
                 positions: torch.Tensor, batch_size: int):
        self.slot = bundle.slot(slot_name)
        tokenizer = self.slot.tokenizer
        token_ids = tokenizer(prompts, truncation=True, max_length=tokenizer.model_max_length).input_ids
        self.groups = length_groups(positions, batch_size)
        self.ids = [torch.tensor([token_ids[i][:int(positions[rows[0]]) + 1] for i in rows],
                                 device=bundle.device) for rows in self.groups]
        self.count = len(prompts)
        self.replayed: int | None = None  # block whose recorded output the next pass replays
        self.recorded: list[torch.Tensor] = []

    @torch.no_grad()
    def read(self, layer: int, current: torch.nn.Module,
             last_block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fc2 inputs of block ``layer`` and ``current``'s output, (prompts, width) each;
        blocks after ``last_block`` are not run."""
        fc2 = self.slot.fc2(layer)
        keys = torch.empty(self.count, fc2.in_features)
        outputs: torch.Tensor | None = None
        recorded = []
        for group, (rows, ids) in enumerate(zip(self.groups, self.ids, strict=True)):
            last = torch.full((len(rows),), ids.shape[1] - 1)
            with ExitStack() as stack:
                if self.replayed is not None:
                    blocks = [self.slot.block(i) for i in range(self.replayed + 1)]
                    stack.enter_context(replay_prefix(blocks, self.recorded[group]))
                key_records = stack.enter_context(capture({"k": fc2}, last, "input"))
                current_records = stack.enter_context(capture({"c": current}, last, "output"))
                if layer > 0:
                    before = stack.enter_context(capture({"b": self.slot.block(layer - 1)}))
                stack.enter_context(stop_after(self.slot.block(last_block)))
                self.slot.encoder(ids)
            keys[rows] = key_records["k"][0].float().cpu()
            read = current_records["c"][0].float().cpu()
            if outputs is None:
                outputs = torch.empty(self.count, read.shape[-1])
            outputs[rows] = read
            if layer > 0:
                recorded.append(before["b"][0])
        # The next pass updates nothing before ``layer``: it replays block layer-1's output.
        self.replayed, self.recorded = (layer - 1, recorded) if layer > 0 else (None, [])
        return keys, outputs


def _protected_keys(reader: _KeyReader | None, owner: torch.Tensor, count: int, layer: int,
                    slot) -> torch.Tensor | None:
    """Mean fc2 keys (d_in, concepts) of the concepts earlier patches edited, at this layer."""
    if reader is None:
        return None
    keys, _ = reader.read(layer, slot.fc2(layer), layer)
    return _mean_by_owner(keys, owner, count).T


def _layer_update(name: str, keys: torch.Tensor, residual: torch.Tensor, second_moment: torch.Tensor,
                  config: Stage2Config, protected: torch.Tensor | None,
                  cache: TensorCache | None) -> torch.Tensor:
    """One block's delta: the closed form (holding the ``protected`` keys), or the closed form
    within the free space (which leaves them out)."""
    if config.projection == "none":
        return closed_form_update(keys, residual, second_moment, config.lam, config.alpha, protected)
    values, vectors = eigen_decomposition(second_moment, cache)
    basis, reduced = free_space(name, values, vectors, config.nullspace_threshold, protected)
    return projected_update(keys, residual, basis, reduced, config.lam, config.alpha)


def held_destinations(requests: list[EditRequest]) -> list[EditRequest]:
    """Each request's destination as a concept whose keys Stage II holds (``destinations="keep"``),
    in its request's prompts, once per destination; none where the destination is empty (an
    erase on Stable Diffusion), a source of ``requests`` (it is edited, or held as an earlier
    batch's concept), or names its own source (an attribute edit, "teal tench" for "tench": its
    key is the source's in another context, which the edit is meant to move)."""
    taken = {r.source.casefold() for r in requests}
    held: dict[str, EditRequest] = {}
    for request in requests:
        name = request.destination.strip()
        key = name.casefold()
        if not name or key in taken or key in held or names_source(request):
            continue
        held[key] = EditRequest(name, "", request.prompts)
    return list(held.values())


def names_source(request: EditRequest) -> bool:
    """Whether the destination holds the source as a whole word ("teal tench" for "tench")."""
    return names_any(request.destination, [request.source])


def preservation_weight(config: Stage2Config, concepts: int, protected: int) -> float:
    """This batch's lam: with ``lam_edits``, the concepts held from earlier patches count as
    edits too (the closed form holds them; the null space only leaves them out)."""
    return config.lam_for(concepts + (protected if config.projection == "none" else 0))


def compute_deltas(
    bundle: ModelBundle,
    targets: list[ConceptTarget],
    layers: dict[str, list[int]],
    second_moments: dict[str, torch.Tensor],
    config: Stage2Config,
    batch_size: int = 256,
    progress: bool = True,
    protected: list[EditRequest] = (),
    cache: TensorCache | None = None,
    destinations: list[EditRequest] = (),
) -> dict[str, torch.Tensor]:
    """The weight delta of every edited fc2, by module name (float32, (d_out, d_in)).

    ``protected``: the requests earlier patches of the chain made, whose keys the update leaves
    alone (held in the closed form, or outside the null space's free space); ``destinations``:
    concepts held the same way but not counted as edits by ``lam_edits`` (nothing writes
    them; :func:`held_destinations`); ``cache``: where C's eigenvectors are kept.
    The model is updated in place while the layers are processed and restored at the end.
    """
    deltas: dict[str, torch.Tensor] = {}
    config = replace(config, lam=preservation_weight(config, len(targets), len(protected)))
    edited = [bundle.slot(s).fc2_name(layer) for s, slot_layers in layers.items() for layer in slot_layers]
    guarded = [*protected, *destinations]
    with restored(bundle, edited):
        for slot_name, slot_layers in layers.items():
            slot = bundle.slot(slot_name)
            prompts, positions, owner = _prompt_batch(targets, slot_name, bundle)
            if config.keys == "prompt":  # every prompt its own key and target
                owner = torch.arange(len(prompts))
            count = int(owner.max()) + 1
            z = _targets(targets, slot_name, config.residual)
            z_layer = max(slot_layers)
            reader = _KeyReader(bundle, slot_name, prompts, positions, batch_size)
            guard_reader, guard_owner = None, None
            if guarded:
                guard_prompts, guard_positions, guard_owner = _request_prompts(guarded, slot_name, bundle)
                guard_reader = _KeyReader(bundle, slot_name, guard_prompts, guard_positions, batch_size)
            ordered = sorted(slot_layers)
            bar = tqdm(ordered, desc=f"Stage II {slot_name}", disable=not progress)
            for i, layer in enumerate(bar):
                fc2 = slot.fc2(layer)
                name = slot.fc2_name(layer)
                # memit: against block l*'s output; release: against this block's MLP output
                if config.residual == "memit":
                    keys_in, current = reader.read(layer, slot.block(z_layer), z_layer)
                else:
                    keys_in, current = reader.read(layer, fc2, layer)
                keys = _mean_by_owner(keys_in, owner, count).T
                residual = _residuals(z, current, owner, count, config.residual)
                residual = residual.T / (len(ordered) - i)
                kept = _protected_keys(guard_reader, guard_owner, len(guarded), layer, slot)
                delta = _layer_update(name, keys, residual, second_moments[name], config, kept,
                                      cache).float()
                add_weights(bundle, {name: delta})
                deltas[name] = delta
    return deltas
