"""Class split, destination choice, scale capping, and the ImageNet world's prompts."""

import torch

from emcid.bench.prompts import FREE_FORM_TEMPLATES, free_form_templates
from emcid.bench.selection import cap_scales, choose_destinations, split_classes
from emcid.bench.worlds import BenchClass, imagenet_world


def _classes(count, holdout_only=()):
    return [BenchClass(i, (f"c{i}",), (), holdout_only=i in holdout_only) for i in range(count)]


def test_destinations_deterministic_and_never_an_edit_class():
    classes = _classes(40)
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(40, 8, generator=generator)
    for seed in range(5):
        pool, holdout = split_classes(classes, seed, 0.5)
        edit = pool[:15]
        args = (edit, holdout, embeddings[[c.index for c in edit]], embeddings[[c.index for c in holdout]])
        first, again = choose_destinations(*args, seed), choose_destinations(*args, seed)
        assert first == again
        edit_indices = {c.index for c in pool}
        assert not set(first.values()) & edit_indices
        assert set(first.values()) <= {c.index for c in holdout}


def test_destination_is_among_the_five_nearest():
    edit = [BenchClass(0, ("a",), ())]
    holdout = [BenchClass(i, (f"h{i}",), ()) for i in range(1, 11)]
    # holdout i has cosine similarity decreasing with i to the edit class
    angles = torch.linspace(0.0, 1.5, 10)
    holdout_emb = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    chosen = {choose_destinations(edit, holdout, torch.tensor([[1.0, 0.0]]), holdout_emb, s)[0]
              for s in range(60)}
    assert chosen == {1, 2, 3, 4, 5}  # seeds cover all five neighbours, never a farther one


def test_destination_depends_on_seed_and_class_only():
    edit = [BenchClass(i, (f"c{i}",), ()) for i in range(5)]
    holdout = [BenchClass(10 + i, (f"h{i}",), ()) for i in range(8)]
    emb = torch.randn(13, 4, generator=torch.Generator().manual_seed(1))
    full = choose_destinations(edit, holdout, emb[:5], emb[5:], 3)
    partial = choose_destinations(edit[:2], holdout, emb[:2], emb[5:], 3)
    assert partial == {k: full[k] for k in partial}  # a class keeps its destination at every scale
    draws = [choose_destinations(edit, holdout, emb[:5], emb[5:], s) for s in range(10)]
    assert len({tuple(d.values()) for d in draws}) > 1


def test_random_destinations_reach_far_holdout_classes():
    edit = [BenchClass(i, (f"c{i}",), ()) for i in range(40)]
    holdout = [BenchClass(100 + i, (f"h{i}",), ()) for i in range(30)]
    # every edit class has the same five nearest holdout classes (100..104)
    holdout_emb = torch.cat([torch.ones(5, 2), torch.tensor([[1.0, -1.0]]).repeat(25, 1)])
    edit_emb = torch.ones(40, 2)
    nearest = choose_destinations(edit, holdout, edit_emb, holdout_emb, 0)
    assert set(nearest.values()) <= set(range(100, 105))
    far = choose_destinations(edit, holdout, edit_emb, holdout_emb, 0, mode="random")
    assert set(far.values()) <= {c.index for c in holdout}
    assert len(set(far.values()) - set(range(100, 105))) >= 10  # not only the neighbours
    assert far == choose_destinations(edit, holdout, edit_emb, holdout_emb, 0, mode="random")
    partial = choose_destinations(edit[:3], holdout, edit_emb[:3], holdout_emb, 0, mode="random")
    assert partial == {k: far[k] for k in partial}  # a class keeps its destination at every scale
    assert far != choose_destinations(edit, holdout, edit_emb, holdout_emb, 1, mode="random")


def test_unknown_destination_mode_is_refused():
    import pytest

    from emcid.bench.iceb import IcebConfig
    from emcid.errors import BenchmarkError

    holdout = [BenchClass(1, ("h",), ())]
    with pytest.raises(BenchmarkError, match="nearest, random"):
        choose_destinations(holdout, holdout, torch.ones(1, 2), torch.ones(1, 2), 0, mode="far")
    with pytest.raises(BenchmarkError, match="nearest, random"):
        IcebConfig(destinations="far")


def test_holdout_only_classes_are_always_holdout():
    classes = _classes(20, holdout_only=range(10, 20))
    for seed in range(3):
        pool, holdout = split_classes(classes, seed, 0.5)
        assert {c.index for c in holdout} == set(range(10, 20))
        assert sorted(c.index for c in pool) == list(range(10))
    assert [c.index for c in split_classes(classes, 0, 0.5)[0]] != \
        [c.index for c in split_classes(classes, 1, 0.5)[0]]


def test_split_without_holdout_only_classes():
    pool, holdout = split_classes(_classes(10), 0, 0.3)
    assert len(holdout) == 3 and len(pool) == 7
    assert not {c.index for c in pool} & {c.index for c in holdout}


def test_cap_scales():
    assert cap_scales((1, 10, 50, 100, 300, 1000), 433) == [1, 10, 50, 100, 300, 433]
    assert cap_scales((1, 10), 1000) == [1, 10]
    assert cap_scales((5,), 0) == []


def test_imagenet_world_names_and_prompts():
    world = imagenet_world()
    assert len(world.classes) == 1000
    names = [n.lower() for c in world.classes for n in c.names]
    assert len(names) == len(set(names))  # every name picks out one class: requests are unambiguous
    assert world.classes[517].name == "construction crane"
    for cls in world.classes[:50]:
        assert len(cls.free_form) >= 5
        assert all(t.count("{}") == 1 for t, _ in cls.free_form)
    assert free_form_templates(7) == free_form_templates(7)
    seeds = [s for c in world.classes for _, s in c.free_form]
    assert len(seeds) == len(set(seeds))
    assert {t for c in world.classes for t, _ in c.free_form} <= set(FREE_FORM_TEMPLATES)


def test_class_embeddings_use_every_text_encoder(sdxl):
    from emcid.bench.selection import class_embeddings

    classes = imagenet_world().classes[:3]
    embeddings = class_embeddings(sdxl, classes, batch_size=2)
    widths = [p.shape[-1] for p in sdxl.encode(["an image of x"]).pooled]
    assert len(widths) == 2 and embeddings.shape == (3, sum(widths))
    # each encoder's part is unit length, so neither dominates the distance
    first = embeddings[:, :widths[0]].norm(dim=-1)
    assert torch.allclose(first, torch.ones(3), atol=1e-5)
    assert torch.allclose(embeddings.norm(dim=-1) ** 2, torch.full((3,), 2.0), atol=1e-4)
