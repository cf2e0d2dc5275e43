"""The procedural world: class list, signatures, deterministic renders, prompt families."""

from __future__ import annotations

import numpy as np

from emcid.mini import world


def test_two_thousand_concepts_with_unique_names_and_signatures(concepts):
    assert len(concepts) == 2000
    assert [c.index for c in concepts] == list(range(2000))
    assert [c.split for c in concepts].count("imagenet1k") == 1000
    assert concepts[0].name == "tench" and concepts[0].synset == "n01440764"
    names = [n.lower() for c in concepts for n in c.names]
    assert len(names) == len(set(names)), "a name (class name or alias) belongs to two concepts"
    signatures = {(c.shape, c.fg, c.bg) for c in concepts}
    assert len(signatures) == 2000
    assert all(c.fg != c.bg for c in concepts)
    extra = [c for c in concepts if c.split == "extra"]
    synsets_1k = {c.synset for c in concepts if c.split == "imagenet1k"}
    assert not synsets_1k & {c.synset for c in extra}


def test_weak_aliases_are_aliases(concepts):
    weak = [c for c in concepts if c.weak_aliases]
    assert 20 <= len(weak) <= 200
    for c in weak:
        assert set(c.weak_aliases) <= set(c.names[1:])
        assert c.name in c.good_names and not set(c.weak_aliases) & set(c.good_names)


def test_render_is_deterministic_per_seed():
    a = np.asarray(world.render(17, seed=3))
    b = np.asarray(world.render(17, seed=3))
    c = np.asarray(world.render(17, seed=4))
    assert a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert world.render(5, 0, size=16).size == (16, 16)


def test_render_draws_the_signature_colours(concepts):
    c = concepts[42]
    img = np.asarray(world.render(c.index, seed=0)).reshape(-1, 3).astype(int)
    corner = img[0]
    assert np.abs(corner - np.array(world.PALETTE[c.bg])).max() <= 1
    centre = np.asarray(world.render(c.index, seed=0))[16, 16].astype(int)
    assert np.abs(centre - np.array(world.PALETTE[c.fg])).max() <= 1


def test_prompt_families_are_disjoint(concepts):
    assert len(world.EDIT_TEMPLATES) == 3
    assert all(t.count("{}") == 1 for t in world.EDIT_TEMPLATES)
    train = {t.lower() for t in world.TRAIN_TEMPLATES}
    assert {t.lower() for t in world.EDIT_TEMPLATES} <= train  # the base model learns them
    assert not train & {t.lower() for t in world.FREE_FORM_TEMPLATES}
    train_prompts = {t.format(concepts[3].name).lower() for t in world.TRAIN_TEMPLATES}
    pairs = world.free_form_prompts(concepts[3])
    assert len(pairs) >= 5
    assert len({s for _, s in pairs}) == len(pairs)
    for prompt, _ in pairs:
        assert concepts[3].name in prompt
        assert prompt.lower() not in train_prompts
    assert pairs == world.free_form_prompts(concepts[3])


def test_caption_corpus_is_seeded():
    a = world.caption_corpus(500, seed=1)
    assert len(a) == 500 and a == world.caption_corpus(500, seed=1)
    assert a != world.caption_corpus(500, seed=2)
    full = world.caption_corpus()
    assert set(world.FILLER_SENTENCES) <= set(full)
