"""Stage II's two residual forms against their equations, re-derived here from the maths.

The EMCID release writes one target per concept, ``z = h_0 + delta`` (block ``l*``'s output at
the subject token of the concept's first prompt, plus Stage I's delta), and at each edited
block ``l`` takes the residual against the mean over the concept's prompts of ``fc2``'s
current output there, spread over the blocks still to come. Its update is written with
``alpha`` folded into the keys, residuals and statistics:

    s = sqrt(a / 0.5),   C' = C (1 - a) / 0.5
    Delta_l = s R_l (lam C' + s^2 K K^T)^{-1} s K

The MEMIT form (the default) keeps a target per prompt, ``z_j = h_j + delta``, and takes the
residual against block ``l*``'s current output. Neither reference uses emcid's Stage II code:
prompts are encoded padded to the longest, with the attention mask, as the release does.
"""

from __future__ import annotations

import pytest
import torch

import emcid
from emcid.editors.emcid import stage2
from emcid.editors.emcid.targets import ConceptTarget

LAYERS = [0, 1, 2]
Z_LAYER = 2
LAM, ALPHA = 2.0, 0.6
REQUESTS = [
    emcid.EditRequest("goldfish", "crab"),
    emcid.EditRequest("owl", "crab", prompts=("a painting of an {} at night", "{}")),
    emcid.EditRequest("xylo", "crab"),  # not in the tiny vocabulary: several tokens
]


def _last_subject_token(tokenizer, prompt: str, subject: str) -> int:
    """Index of the subject's last token in the prompt's ids (its last occurrence)."""
    ids = tokenizer(prompt).input_ids
    word = tokenizer(subject, add_special_tokens=False).input_ids
    start = max(i for i in range(len(ids) - len(word) + 1) if ids[i:i + len(word)] == word)
    return start + len(word) - 1


def _read(slot, requests, modules: dict[str, torch.nn.Module]) -> dict[str, list[torch.Tensor]]:
    """Per request, (prompts, width) rows of each module's input (name 'in:*') or output at
    the subject tokens, from one padded encoding of every request's prompts."""
    prompts = [p for r in requests for p in r.source_prompts()]
    where = [_last_subject_token(slot.tokenizer, t.format(r.source), r.source)
             for r in requests for t in r.prompts]
    seen = {}

    def hook(name):
        def record(_module, inputs, output):
            tensor = inputs[0] if name.startswith("in:") else output
            tensor = tensor[0] if isinstance(tensor, tuple) else tensor
            seen[name] = tensor[torch.arange(len(where)), where].detach().double()
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            slot.encoder(**slot.tokenizer(prompts, padding=True, return_tensors="pt"))
    finally:
        for handle in handles:
            handle.remove()
    counts = [len(r.prompts) for r in requests]
    return {name: list(rows.split(counts)) for name, rows in seen.items()}


def _concept_targets(slot, deltas: list[torch.Tensor]) -> list[ConceptTarget]:
    """Targets as Stage I leaves them: the unedited block-l* output per prompt, and a delta."""
    hidden = _read(slot, REQUESTS, {"h": slot.block(Z_LAYER)})["h"]
    return [ConceptTarget(r, {slot.name: Z_LAYER}, {slot.name: d}, {slot.name: h.float()}, 0.0)
            for r, d, h in zip(REQUESTS, deltas, hidden, strict=True)]


def _reference(slot, targets: list[ConceptTarget], moments: dict, form: str) -> dict:
    """Stage II from the equations in this module's docstring; updates the model in place."""
    deltas = {}
    for i, layer in enumerate(LAYERS):
        fc2 = slot.fc2(layer)
        read = _read(slot, REQUESTS, {"in:k": fc2, "m": fc2, "b": slot.block(Z_LAYER)})
        keys = torch.stack([k.mean(0) for k in read["in:k"]], dim=1)
        if form == "release":
            z = torch.stack([t.source_hidden[slot.name][0] + t.deltas[slot.name] for t in targets], 1)
            residual = z.double() - torch.stack([m.mean(0) for m in read["m"]], dim=1)
        else:
            residual = torch.stack([(t.targets(slot.name).double() - b).mean(0)
                                    for t, b in zip(targets, read["b"], strict=True)], dim=1)
        scale = (ALPHA / 0.5) ** 0.5
        second = moments[slot.fc2_name(layer)].double() * (1 - ALPHA) / 0.5
        keys, residual = keys * scale, residual * scale / (len(LAYERS) - i)
        adjusted = torch.linalg.solve(LAM * second + keys @ keys.T, keys)
        deltas[slot.fc2_name(layer)] = update = residual @ adjusted.T
        with torch.no_grad():
            fc2.weight += update.float()
    return deltas


def _setup(bundle):
    """Random deltas and random positive definite statistics C for the edited blocks."""
    slot = bundle.slot("text_encoder")
    generator = torch.Generator().manual_seed(0)
    deltas = [torch.randn(slot.hidden_size, generator=generator) for _ in REQUESTS]
    width = slot.fc2(0).in_features
    moments = {}
    for layer in LAYERS:
        spread = torch.randn(width, width, generator=generator)
        moments[slot.fc2_name(layer)] = spread @ spread.T / width + torch.eye(width)
    return slot, _concept_targets(slot, deltas), moments


def _emcid(bundle, targets, moments, form: str) -> dict[str, torch.Tensor]:
    config = stage2.Stage2Config(lam=LAM, alpha=ALPHA, residual=form)
    return stage2.compute_deltas(bundle, targets, {"text_encoder": LAYERS}, moments, config,
                                 progress=False)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("form", ["release", "memit"])
def test_stage2_equals_its_equations(sd1, form):
    """release: one z = h_0 + delta per concept against the mean fc2 output (the release);
    memit: per-prompt z against block l*'s output (the default, as before)."""
    slot, targets, moments = _setup(sd1)
    found = _emcid(sd1, targets, moments, form)
    expected = _reference(slot, targets, moments, form)
    assert found.keys() == expected.keys()
    for name, delta in expected.items():
        assert delta.abs().max() > 0
        assert _relative(found[name], delta) < 1e-5, (form, name)


def test_the_forms_differ_where_the_prompts_differ(sd1):
    """The concepts' prompts have different hidden states, so the two forms write different
    updates; the release form reads only the first prompt's h (the others may change)."""
    _, targets, moments = _setup(sd1)
    memit, release = (_emcid(sd1, targets, moments, form) for form in ("memit", "release"))
    for name in memit:
        assert _relative(release[name], memit[name]) > 1e-2, name
    for target in targets:
        rows = target.source_hidden["text_encoder"]
        target.source_hidden["text_encoder"] = torch.cat([rows[:1], rows[1:] + 1.0])
    first = _emcid(sd1, targets, moments, "release")
    for name in release:
        assert _relative(first[name], release[name]) < 1e-5, name
