"""The embedded world as ICEB sees it, and merging results of several methods."""

import pytest

from emcid.bench.results import merge_previous


def test_mini_world_classes_and_prompts(tmp_path):
    pytest.importorskip("emcid.mini.world")
    from emcid.bench.worlds import mini_world

    world = mini_world()
    assert len(world.classes) == 2000
    assert sum(c.holdout_only for c in world.classes) == 1000  # the extra concepts
    assert all(not c.holdout_only for c in world.classes[:1000])
    for cls in world.classes[:20]:
        assert len(cls.free_form) >= 5
        # templates keep the sentence and take any name: used for aliases in rectification
        assert all(t.count("{}") == 1 for t, _ in cls.free_form)
    paths = world.reference_images(world.classes[3], tmp_path, count=2)
    assert len(paths) == 2
    from PIL import Image

    assert all(Image.open(p).size == (32, 32) for p in paths)


def test_imagenet_reference_dir(tmp_path):
    from emcid.bench.worlds import imagenet_world

    (tmp_path / "n01440764").mkdir()
    for name in ("b.jpg", "a.png", "notes.txt"):
        (tmp_path / "n01440764" / name).write_bytes(b"x")
    world = imagenet_world(tmp_path)
    found = world.reference_images(world.classes[0], tmp_path)
    assert [p.split("/")[-1] for p in found] == ["a.png", "b.jpg"]
    assert world.reference_images(world.classes[1], tmp_path) == []
    assert imagenet_world().reference_images(world.classes[0], tmp_path) == []


def _results(method, value, seed=0):
    return {"model_fingerprint": "f", "world": "imagenet", "judge": "j", "method": method,
            "settings": {"seed": seed},
            "subtasks": {"aice": {"scales": {"1": {method: {"holdout_delta": value}}}}}}


def test_other_methods_are_kept_from_an_earlier_run():
    merged = merge_previous(_results("emcid", -0.01), _results("uce", -0.4))
    assert merged["subtasks"]["aice"]["scales"]["1"] == {"emcid": {"holdout_delta": -0.01},
                                                         "uce": {"holdout_delta": -0.4}}
    # another seed is another experiment: nothing is carried over
    other_seed = merge_previous(_results("emcid", 0.0), _results("uce", -0.4, seed=1))
    assert set(other_seed["subtasks"]["aice"]["scales"]["1"]) == {"emcid"}


def test_demo_refuses_without_the_embedded_model(monkeypatch, tmp_path):
    pytest.importorskip("emcid.mini")
    import emcid.mini
    from emcid.bench.demo import DEMO_HOLDOUT, DEMO_POOL, demo_classes, run_demo
    from emcid.errors import EmcidError

    monkeypatch.setattr(emcid.mini, "weights_present", lambda: False)
    with pytest.raises(EmcidError, match="not installed"):
        run_demo(tmp_path)
    classes = demo_classes(0)
    assert classes == demo_classes(0) and len(classes) == DEMO_POOL + DEMO_HOLDOUT
    assert sum(i >= 1000 for i in classes) == DEMO_HOLDOUT  # the extra concepts are the holdout
