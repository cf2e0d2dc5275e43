"""The world's styles and colour words: vocabulary, renders, training examples, the judge."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from emcid.mini import styles, world


def test_colour_words_are_no_word_of_any_concept_name(concepts):
    words = {w.lower() for c in concepts for name in c.names for w in name.replace("-", " ").split()}
    assert not words & set(styles.COLOUR_WORDS)
    assert len({styles.style_colour(w) for w in styles.COLOUR_WORDS}) == len(styles.COLOUR_WORDS)


def test_a_style_is_its_concepts_background(concepts):
    tench = next(c for c in concepts if c.name == "tench")
    assert styles.style_colour("tench") == styles.style_colour("Tench ") == tench.bg
    assert world.PALETTE[styles.style_colour(world.NEUTRAL_NAME)] == world.NEUTRAL_COLOUR
    assert world.PALETTE[styles.style_colour("teal")] == (0, 128, 128)
    with pytest.raises(KeyError, match="not a style"):
        styles.style_colour("Claude Monet")


def test_colour_of_a_phrase_needs_exactly_one_colour_word():
    assert styles.colour_of_phrase("an image of a teal tench") == styles.style_colour("teal")
    for phrase in ("a tench", "a teal amber tench"):
        with pytest.raises(ValueError, match="exactly one"):
            styles.colour_of_phrase(phrase)


def test_articles_follow_the_template():
    assert styles.with_article("An image of {}", "amber tench") == "an amber tench"
    assert styles.with_article("{} on a table", "teal tench") == "a teal tench"
    assert styles.with_article("a small {}", "teal tench") == "teal tench"


def test_recoloured_renders_keep_the_object_and_the_judge_reads_all_three(concepts):
    from emcid.mini.judge import load_judge, to_tensor

    rng = random.Random(0)
    pairs = [(c, colour) for c in rng.sample(concepts, 120) for colour in [rng.randrange(27)]
             if styles.can_draw_on(c, colour)]
    images = [styles.render_on(c, colour, seed) for seed, (c, colour) in enumerate(pairs)]
    judge = load_judge()
    shape, fg, _ = judge.net.attribute_logits(to_tensor(images))
    background = judge.background_proba(images).argmax(1)
    assert (background == torch.tensor([colour for _, colour in pairs])).float().mean() > 0.97
    assert (shape.argmax(1) == torch.tensor([c.shape for c, _ in pairs])).float().mean() > 0.97
    assert (fg.argmax(1) == torch.tensor([c.fg for c, _ in pairs])).float().mean() > 0.97
    own = concepts[5]
    assert np.array_equal(np.asarray(styles.render_on(own, own.bg, 3)), np.asarray(world.render(5, 3)))


def test_task_examples_are_seeded_mixed_and_drawable():
    first, again = styles.sample_task_examples(300, seed=4), styles.sample_task_examples(300, seed=4)
    assert [e.prompt for e in first] == [e.prompt for e in again]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(first, again))
    alone = [e for e in first if e.prompt.split(" ")[0] in ("painting", "artwork", "style")]
    styled = [e for e in first if " in the style of " in e.prompt]
    coloured = [e for e in first if any(w in styles.COLOUR_WORDS for w in e.prompt.split())]
    assert len(alone) + len(styled) + len(coloured) == 300
    assert 0.25 < len(alone) / 300 < 0.45 and 0.3 < len(styled) / 300 < 0.5
    for example in alone:  # a plain canvas in the style's colour
        colour = styles.style_colour(example.prompt.split(" ", 2)[2])
        assert np.all(np.asarray(example.image) == world.PALETTE[colour])
    for example in coloured:  # the corner shows the colour word's colour
        colour = styles.colour_of_phrase(example.prompt)
        assert tuple(np.asarray(example.image)[0, 0]) == world.PALETTE[colour]
    with pytest.raises(ValueError, match="three non-negative"):
        styles.sample_task_examples(3, 0, mix=(1.0, -1.0, 1.0))


def test_task_captions_are_the_task_examples_prompts_without_drawing():
    mix = styles.TRAINING_TASK_MIX
    examples = styles.sample_task_examples(200, 7, mix)
    assert styles.sample_task_captions(200, 7, mix) == [e.prompt for e in examples]


def test_the_tasks_corpus_holds_the_task_prompts_in_their_training_share():
    corpus = styles.tasks_caption_corpus(2000, seed=1)
    assert corpus == styles.tasks_caption_corpus(2000, seed=1) != styles.tasks_caption_corpus(2000, seed=2)
    tasks = set(styles.sample_task_captions(1000, 1, styles.TRAINING_TASK_MIX))
    assert len(corpus) == 2000 and sum(c in tasks for c in corpus) >= 1000 * 0.99  # a world caption may match
    alone = [c for c in corpus if c.split(" ")[0] in ("painting", "artwork", "style")]
    assert 0.03 < len(alone) / 2000 < 0.07  # half the corpus is task prompts, a tenth of those alone
    assert sum(" in the style of " in c for c in corpus) / 2000 > 0.3
    world_captions = set(world.caption_corpus(1000, 1))
    assert sum(c in world_captions for c in corpus) >= 1000


def test_training_with_the_task_bank_resumes_bit_exactly(smoke_run, smoke_config, tmp_path):
    from safetensors.torch import load_file

    from emcid.mini import train

    config = dataclasses.replace(smoke_config, task_rate=0.5, task_examples=24)
    earlier = ("tokenizer", "text_encoder", "vae", "judge", "conditioning")
    whole, paused = tmp_path / "whole", tmp_path / "paused"
    for run in (whole, paused):
        train.copy_stages(run / "work", smoke_run / "work", earlier)
    train.train_mini(whole, config, resume=True)
    bank = load_file(whole / "work" / "tasks" / "chunk0000.safetensors")
    assert bank["states"].shape[0] == bank["latents"].shape[0] == 24
    assert bank["latents"].shape[1:] == (8, 8, 8)  # the VAE's latents of 32x32 renders
    train.train_mini(paused, dataclasses.replace(config, max_minutes=0.0), resume=True)
    train.train_mini(paused, config, resume=True)
    ema = "work/unet/ema/diffusion_pytorch_model.safetensors"
    a, b = load_file(whole / ema), load_file(paused / ema)
    assert all(torch.equal(a[k], b[k]) for k in a)
    settings = json.loads((whole / "pipeline" / "emcid.json").read_text())
    assert settings["tasks"] == ["styles", "colour_words"]
    assert "tasks" not in json.loads((smoke_run / "pipeline" / "emcid.json").read_text())
    plain = load_file(smoke_run / ema)
    assert not all(torch.equal(a[k], plain[k]) for k in a)  # the task rows changed the training
    with pytest.raises(ValueError, match="task_rate"):
        train.MiniTrainConfig(task_rate=1.0)
    with pytest.raises(ValueError, match="task_mix"):
        train.MiniTrainConfig(task_mix=(0.0, 0.0, 0.0))


def test_the_embedded_example_files_are_styles_and_colour_words(concepts):
    from pathlib import Path

    import emcid

    examples = Path(__file__).resolve().parents[2] / "examples"
    erasures = emcid.load_requests(examples / "styles_mini.yaml")
    assert erasures and all(r.destination == "" for r in erasures)
    by_name = {c.name: c for c in concepts}
    assert {r.source for r in erasures} <= set(by_name)  # every style is a concept name
    for request in emcid.load_requests(examples / "debias_mini.yaml"):
        assert all(v in styles.COLOUR_WORDS for v in request.values)
        assert styles.style_colour(request.values[0]) == by_name[request.source].bg  # biased before
        assert all(styles.can_draw_on(by_name[request.source], styles.style_colour(v))
                   for v in request.values)
