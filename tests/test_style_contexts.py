"""Style contexts ("<caption> in the style of X" prompts for artist requests) and Stage II's
per-prompt keys."""

import pytest
import torch

import emcid
from emcid.concepts import ARTIST_PROMPTS
from emcid.core.weights import add_weights
from emcid.editors import get_editor
from emcid.editors.emcid import stage2
from emcid.editors.emcid.contexts import with_written_contexts
from emcid.editors.emcid.stage1 import ConceptTarget
from emcid.errors import OptionError
from emcid.hooks import capture
from emcid.requests import subject_positions


def test_artist_requests_get_seeded_style_contexts_after_the_release_prompts(sd1):
    editor = get_editor("emcid", sd1, task="artist", style_contexts=3)
    own = emcid.EditRequest("cat", "dog", ("a {} sleeping",))
    given = emcid.EditRequest("Monet", "", ARTIST_PROMPTS)  # the task's own prompts, written out
    monet, again, other = editor.prepare([emcid.EditRequest("Monet", ""), given,
                                          emcid.EditRequest("Turner", "")], sd1)
    assert monet.prompts[:3] == ARTIST_PROMPTS and len(monet.prompts) == 6
    assert all(p.endswith(" in the style of {}") and p.count("{}") == 1 for p in monet.prompts[3:])
    assert again.prompts == monet.prompts  # a request's prompts depend on its source alone
    assert other.prompts[3:] != monet.prompts[3:]
    assert editor.prepare([own], sd1) == [own]  # the user's own prompts are left alone
    plain = get_editor("emcid", sd1, task="artist", style_contexts=0)
    assert plain.prepare([emcid.EditRequest("Monet", "")], sd1)[0].prompts == ARTIST_PROMPTS


@pytest.mark.parametrize("options, message", [
    ({"style_contexts": -1}, "style_contexts=-1"),
    ({"style_contexts": 65}, "at most 64"),
    ({"written_contexts": -2}, "written_contexts=-2"),
    ({"written_contexts": 65}, "at most 64"),
    ({"profile": "release", "written_contexts": 4}, "profile 'release' sets written_contexts=0"),
    ({"keys": "token"}, "keys"),
    ({"keys": "prompt", "residual": "release"}, "residual='memit'"),
])
def test_bad_context_and_key_options_are_refused(options, message):
    with pytest.raises(OptionError, match=message):
        get_editor("emcid", **options)


def _targets(requests, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [ConceptTarget(r, {"text_encoder": 2},
                          {"text_encoder": torch.randn(width, generator=generator)},
                          {"text_encoder": torch.randn(len(r.prompts), width, generator=generator)}, 0.0)
            for r in requests]


def _states(bundle, request, layer):
    slot = bundle.slot("text_encoder")
    positions = subject_positions(slot.tokenizer, request.prompts, request.source)
    with torch.no_grad(), capture({"b": slot.block(layer)}, positions) as records:
        slot.encoder(slot.tokenize(request.source_prompts()))
    return records["b"][0]


def test_per_prompt_keys_equal_concept_keys_for_one_prompt_each(sd1):
    requests = [emcid.EditRequest(s, "crab", ("a photo of {}",)) for s in ("lobster", "owl")]
    fc2 = sd1.slot("text_encoder").fc2(0)
    moments = {sd1.slot("text_encoder").fc2_name(i): torch.eye(fc2.in_features) for i in range(3)}
    targets = _targets(requests, fc2.out_features)
    found = {keys: stage2.compute_deltas(sd1, targets, {"text_encoder": [0, 1, 2]}, moments,
                                         stage2.Stage2Config(lam=1.0, keys=keys), progress=False)
             for keys in ("concept", "prompt")}
    for name, delta in found["concept"].items():
        assert torch.allclose(found["prompt"][name], delta, atol=1e-6)


def test_per_prompt_keys_write_each_prompts_own_target(sd1):
    """With weak preservation and one written block, a key per prompt reaches every prompt's
    target, where the concept's mean key reaches only their mean."""
    request = emcid.EditRequest("lobster", "crab", ("a photo of {}", "{} on a table at night"))
    slot = sd1.slot("text_encoder")
    moments = {slot.fc2_name(2): torch.eye(slot.fc2(2).in_features)}
    (target,) = _targets([request], slot.fc2(2).out_features, seed=3)
    before = _states(sd1, request, 2)
    target.source_hidden["text_encoder"] = before  # the targets: each prompt's state + delta
    delta = target.deltas["text_encoder"]
    errors = {}
    for keys in ("concept", "prompt"):
        config = stage2.Stage2Config(lam=1e-6, keys=keys)
        deltas = stage2.compute_deltas(sd1, [target], {"text_encoder": [2]}, moments, config, progress=False)
        add_weights(sd1, deltas)
        try:
            errors[keys] = (_states(sd1, request, 2) - before - delta).norm(dim=1)
        finally:
            add_weights(sd1, {n: -d for n, d in deltas.items()})
    assert errors["prompt"].max() < 1e-3 * delta.norm()
    assert errors["concept"].max() > 10 * errors["prompt"].max()


def test_written_contexts_reach_stage_two_only_with_their_own_states(sd1):
    """Stage I distils the request's own prompts; Stage II gets the written contexts too, each
    with its unedited state at l* plus the concept's delta, and none repeats a Stage I prompt."""
    options = {"style_contexts": 2, "steps": 2, "stats_samples": 64, "image_steps": 2}
    plain = get_editor("emcid", sd1, task="artist", **options)
    written = get_editor("emcid", sd1, task="artist", written_contexts=3, **options)
    (request,) = plain.prepare([emcid.EditRequest("Monet", "")], sd1)
    layers = plain.layers_for(sd1)
    (target,) = plain.stage1_targets(sd1, [request], layers, progress=False)
    (extended,) = written.written_contexts(sd1, [target])
    assert extended.request.prompts[:len(request.prompts)] == request.prompts
    extra = extended.request.prompts[len(request.prompts):]
    assert len(extra) == 3 and not set(extra) & set(request.prompts)
    assert all(p.endswith(" in the style of {}") for p in extra)
    assert extra == written.written_contexts(sd1, [target])[0].request.prompts[len(request.prompts):]
    (name, layer), = target.z_layer.items()
    states = _states(sd1, emcid.EditRequest("Monet", "", extra), layer)
    assert torch.allclose(extended.source_hidden[name][len(request.prompts):], states, atol=1e-5)
    assert torch.equal(extended.source_hidden[name][:len(request.prompts)], target.source_hidden[name])
    assert torch.equal(extended.deltas[name], target.deltas[name])
    assert with_written_contexts(sd1, [target], [()]) == [target]
    # object requests (not the task's default prompts) are left alone
    own = plain.stage1_targets(sd1, [emcid.EditRequest("cat", "", ("a {} asleep",))], layers, False)
    assert written.written_contexts(sd1, own) == own
    # several targets are extended in one pass, each with its own prompts only
    both = written.written_contexts(sd1, [own[0], target])
    assert both[0] == own[0]
    assert both[1].request == extended.request
    assert torch.allclose(both[1].source_hidden[name], extended.source_hidden[name], atol=1e-5)


def test_an_artist_edit_writes_its_written_contexts(sd1):
    options = {"style_contexts": 1, "steps": 2, "stats_samples": 64, "image_steps": 2, "keys": "prompt"}
    requests = [emcid.EditRequest("Monet", "")]
    plain = emcid.edit(sd1, requests, task="artist", progress=False, **options)
    written = emcid.edit(sd1, requests, task="artist", progress=False, written_contexts=2, **options)
    assert written.metadata["hparams"]["written_contexts"] == 2
    assert any(not torch.allclose(plain.deltas[n].dense(), written.deltas[n].dense()) for n in plain.deltas)
