"""Where Stage I starts: the text estimate h_dst - h_src at l* (emcid) or zero (the release)."""

from dataclasses import asdict

import pytest
import torch

import emcid
from emcid.cache import TensorCache, content_key
from emcid.editors import editor_from_patch, get_editor
from emcid.editors.emcid.stage1 import Stage1Config, cache_key_for, compute_targets
from emcid.hooks import capture
from emcid.requests import subject_positions

LAYER = {"text_encoder": 2}
FROZEN = {"lr": 1e-5, "steps": 1}  # one Adam step moves each entry by about 1e-5 at most


def _state_at(bundle, prompts, subject):
    """Unedited block-2 output at the last token of ``subject`` in each prompt."""
    with torch.no_grad(), capture({"b": bundle.slot("text_encoder").block(2)}) as record:
        bundle.encode(prompts)
    positions = subject_positions(bundle.tokenizer, ["{}", "a {} on a hill"], subject)
    states = record["b"][0]
    return states[torch.arange(len(prompts)), positions]


def test_stage1_starts_from_the_destination_state_minus_the_source_state(sd1):
    request = emcid.EditRequest("castle", "tower", ("{}", "a {} on a hill"), seed=2)
    target, = compute_targets(sd1, [request], LAYER, Stage1Config(**FROZEN),
                              TensorCache("start-text", enabled=False), progress=False)
    h_src = _state_at(sd1, request.source_prompts(), "castle")
    h_dst = _state_at(sd1, request.destination_prompts(), "tower")
    expected = (h_dst - h_src).mean(0)
    assert expected.abs().max() > 1e-2  # far above the tolerance: a zero start would fail
    assert torch.allclose(target.deltas["text_encoder"], expected, atol=1e-4 + 2e-5)
    assert torch.allclose(target.source_hidden["text_encoder"], h_src, atol=1e-5)


def test_release_start_is_zero_and_an_empty_destination_starts_from_zero(sd1):
    requests = [emcid.EditRequest("castle", "tower", seed=2), emcid.EditRequest("zebra", "", seed=1)]
    zero = compute_targets(sd1, requests[:1], LAYER, Stage1Config(init="zero", **FROZEN),
                           TensorCache("start-zero", enabled=False), progress=False)
    assert zero[0].deltas["text_encoder"].abs().max() < 2e-5
    text = compute_targets(sd1, requests, LAYER, Stage1Config(**FROZEN),
                           TensorCache("start-mixed", enabled=False), progress=False)
    assert text[0].deltas["text_encoder"].norm() > 1e-2  # a word to start from
    assert text[1].deltas["text_encoder"].abs().max() < 2e-5  # an erase to nothing: no word


def test_the_start_stays_inside_the_norm_clamp(sd1):
    request = emcid.EditRequest("castle", "tower", seed=2)
    target, = compute_targets(sd1, [request], LAYER, Stage1Config(clamp_factor=0.01, **FROZEN),
                              TensorCache("start-clamp", enabled=False), progress=False)
    limit = 0.01 * target.source_hidden["text_encoder"][0].norm()
    assert float(target.deltas["text_encoder"].norm()) <= float(limit) + 1e-4


def test_release_start_keeps_the_cache_keys_made_before_the_option(sd1):
    request = emcid.EditRequest("castle", "tower")
    zero = Stage1Config(init="zero", stop_tolerance=0.0, distil_on="source")
    text = Stage1Config(stop_tolerance=0.0, distil_on="source")
    settings = {"height": 32}
    device = torch.device("cpu")
    before = asdict(zero)
    # the fields keys made before them lacked
    for name in ("init", "conditioning", "latents", "stop_tolerance", "stop_window", "min_steps",
                 "min_timestep", "lr_schedule", "distil_on"):
        del before[name]
    assert cache_key_for("m", request, LAYER, zero, settings, device) == content_key(
        model="m", request=request.to_dict(), images=[], z_layer=LAYER, config=before,
        image_settings=settings)
    assert cache_key_for("m", request, LAYER, text, settings, device) != \
        cache_key_for("m", request, LAYER, zero, settings, device)


def test_patches_made_before_the_option_rebuild_with_the_release_start(sd1):
    editor = get_editor("emcid", sd1, steps=2, layers={"text_encoder": [1, 2]})
    assert editor.config.stage1.init == "text"
    metadata = {"method": "emcid", "hparams": editor.hparams()}
    del metadata["hparams"]["stage1"]["init"]
    assert editor_from_patch(metadata).config.stage1.init == "zero"
    assert get_editor("memit", sd1).config.stage1.init == "zero"  # MEMIT's compute_z starts at zero


def test_the_command_line_selects_the_start_and_the_patch_records_it(tmp_path, sd1_dir):
    import yaml

    from emcid.cli import main

    requests = tmp_path / "r.yaml"
    requests.write_text(yaml.safe_dump([{"source": "tench", "destination": "goldfish"}]))
    for start in ("zero", None):
        out = tmp_path / f"{start}.safetensors"
        flags = ["--init", start] if start else []
        assert main(["edit", "--model", str(sd1_dir), "--requests", str(requests), "--out", str(out),
                     "--steps", "1", "--stats-samples", "20", "--lam", "1.0", "--layers", "1-2",
                     *flags]) == 0
        assert emcid.EditPatch.load(out).metadata["hparams"]["stage1"]["init"] == (start or "text")


@pytest.mark.parametrize("model", ["sd1", "sdxl"])
def test_states_read_up_to_the_token_equal_the_pipelines_77_token_pass(model, request):
    """The text start reads each destination only up to its token (causal encoders): the same
    states as the full pass, at a fraction of its cost."""
    from emcid.core.hooks import gather_positions
    from emcid.core.tokens import subject_positions
    from emcid.editors.emcid.stage1.start import record_block_outputs, states_at

    bundle = request.getfixturevalue(model)
    templates = ["An image of {}", "a photo of {} on a table", "{}"]
    names = ["goldfish", "a very long multi word concept"]
    prompts = [t.format(n) for n in names for t in templates]
    for slot in bundle.slots():
        positions = torch.cat([subject_positions(slot.tokenizer, templates, n) for n in names])
        short = states_at(bundle, slot.name, 2, prompts, positions)
        passed = record_block_outputs(bundle, {slot.name: 2}, lambda: bundle.encode(prompts))
        full = gather_positions(passed[slot.name], positions)
        assert torch.allclose(short, full, atol=1e-5 * float(full.abs().max()))
