"""The style fine-tune of the mini text encoder (`emcid mini train --style-steps`)."""

from __future__ import annotations

import random

import pytest
import torch

from emcid.mini import style_encoder, styles, world


@pytest.fixture()
def tiny_encoder(trained_tokenizer):
    from emcid.mini.text_encoder import TextEncoderConfig, build_text_encoder
    from emcid.mini.tokenizer import load_tokenizer

    tok = load_tokenizer(trained_tokenizer)
    torch.manual_seed(0)
    cfg = TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return build_text_encoder(tok, cfg), tok


def test_styled_prompts_name_the_object_then_the_style_and_label_the_mix(concepts):
    items, labels = style_encoder.styled_items(concepts, random.Random(1), 40)
    by_name = {n.lower(): c for c in concepts for n in c.good_names}
    for (style_name, template), (shape, fg, bg) in zip(items, labels.tolist(), strict=True):
        prompt = template.format(style_name)
        assert prompt.endswith(f" in the style of {style_name}")
        style = by_name[style_name.lower()]
        assert bg == style.bg
        objects = [c for c in concepts if (c.shape, c.fg) == (shape, fg)
                   and any(n in prompt[: -len(style_name)] for n in c.good_names)]
        assert objects and all(styles.can_draw_on(c, bg) for c in objects)


def test_unchanged_prompts_carry_one_colour_word_in_their_second_part(concepts):
    prompts = style_encoder.unchanged_prompts(concepts, random.Random(2), 20)
    assert len(prompts) == 30
    for prompt in prompts[20:]:
        assert styles.colour_of_phrase(prompt) in range(len(world.PALETTE))


def test_style_tune_moves_the_composition_and_resumes_bit_exactly(tiny_encoder, tmp_path, monkeypatch):
    model, tok = tiny_encoder
    cfg = style_encoder.StyleTuneConfig(steps=4, batch_size=4, probe_steps=2)
    base = {k: v.clone() for k, v in model.state_dict().items()}

    whole = type(model)(model.config)
    whole.load_state_dict(base)
    metrics = style_encoder.tune_for_styles(whole, tok, cfg)
    assert set(metrics) >= {"styled_x_bg", "styled_end_bg", "alone_bg", "unchanged_relative_mse"}
    assert metrics["unchanged_relative_mse"] > 0  # every weight trained, the states moved
    assert any(not torch.equal(whole.state_dict()[k], base[k]) for k in base)

    calls = {"n": 0}
    real = style_encoder.style_losses

    def stop_after_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    state = tmp_path / "state.pt"
    interrupted = type(model)(model.config)
    interrupted.load_state_dict(base)
    monkeypatch.setattr(style_encoder, "style_losses", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        style_encoder.tune_for_styles(interrupted, tok, cfg, state_file=state, checkpoint_minutes=0)
    monkeypatch.setattr(style_encoder, "style_losses", real)
    resumed = type(model)(model.config)
    resumed.load_state_dict(base)
    style_encoder.tune_for_styles(resumed, tok, cfg, state_file=state, checkpoint_minutes=0)
    assert all(torch.equal(resumed.state_dict()[k], whole.state_dict()[k]) for k in base)


def test_style_tune_settings_are_checked():
    with pytest.raises(ValueError, match="style fine-tune"):
        style_encoder.StyleTuneConfig(steps=-1)
    with pytest.raises(ValueError, match="style fine-tune"):
        style_encoder.StyleTuneConfig(lr=0)


def test_the_style_stage_replaces_the_exported_encoder(smoke_run, smoke_config, tmp_path):
    import dataclasses
    import json

    from safetensors.torch import load_file

    from emcid.mini import train

    style = style_encoder.StyleTuneConfig(steps=2, batch_size=4, probe_steps=2)
    cfg = dataclasses.replace(smoke_config, style=style)
    train.train_mini(tmp_path, cfg, reuse_from=smoke_run / "work",
                     reuse_stages=("tokenizer", "text_encoder", "vae", "judge"))
    done = json.loads((tmp_path / "work" / "style_encoder" / "DONE").read_text())
    assert "styled_x_bg" in done["probe"] and not (tmp_path / "work" / "style_encoder" / "state.pt").exists()
    tuned = load_file(tmp_path / "work" / "style_encoder" / "model.safetensors")
    exported = load_file(tmp_path / "pipeline" / "text_encoder" / "model.safetensors")
    pretrained = load_file(smoke_run / "work" / "text_encoder" / "model.safetensors")
    assert all(torch.equal(exported[k], tuned[k]) for k in tuned)
    assert any(not torch.equal(tuned[k], pretrained[k]) for k in tuned)
