"""The shipped embedded model: loads through stock diffusers and passes a sampled bar check."""

from __future__ import annotations

import json
import random

import pytest
import torch

from emcid.mini import default_model_dir, weights_present, world

pytestmark = pytest.mark.skipif(not weights_present(), reason="shipped mini weights absent")


def test_shipped_size_and_format():
    root = default_model_dir().parent
    files = [p for p in root.rglob("*") if p.is_file()]
    # the default pipeline (36 MB), its judge, and embedded:tasks' own UNet and encoder (28 MB)
    assert sum(p.stat().st_size for p in files) < 70 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt", ".pth", ".pkl")]
    settings = json.loads((default_model_dir() / "emcid.json").read_text())
    assert {"num_inference_steps", "guidance_scale", "height", "width"} <= set(settings)


def test_shipped_pipeline_loads_through_stock_diffusers():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(default_model_dir()))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    te = pipe.text_encoder
    assert te.dtype == torch.float32  # stored float16, loaded float32
    # SD 1.x's editing geometry: the release's blocks 0-10 with 3,072-wide fc2 inputs
    assert te.config.num_hidden_layers == 12
    fc2 = [m for name, m in te.named_modules() if name.endswith("layers.10.mlp.fc2")]
    assert len(fc2) == 1 and fc2[0].in_features == 3072


def test_shipped_judge_is_accurate_on_clean_renders():
    from emcid.mini.judge import load_judge

    judge = load_judge()
    pick = random.Random(0).sample(range(2000), 300)
    images = [world.render(i, seed=777) for i in pick]
    pred = judge.predict_proba(images).argmax(-1)
    assert float((pred == torch.tensor(pick)).float().mean()) >= 0.98


def test_shipped_model_draws_a_few_concepts():
    """A small sampled check of the bars: edit and free-form prompts of a few concepts."""
    import emcid
    from emcid.generation import generate
    from emcid.mini.judge import load_judge

    bundle = emcid.load_model(default_model_dir())
    judge = load_judge()
    concepts = world.load_concepts()
    pick = random.Random(1).sample(concepts, 12)
    prompts = [world.EDIT_TEMPLATES[i % 3].format(c.name) for i, c in enumerate(pick)]
    seeds = [c.index for c in pick]
    free = [world.free_form_prompts(c)[0] for c in pick]
    images = generate(bundle, prompts + [p for p, _ in free], seeds + [s for _, s in free],
                      progress=False)  # fmt: skip
    pred = judge.predict_proba(images).argmax(-1)
    truth = torch.tensor([c.index for c in pick] * 2)
    hits = pred == truth
    assert float(hits[:12].float().mean()) >= 0.75
    assert float(hits[12:].float().mean()) >= 0.7


def test_shipped_unet_reads_the_subject_token_and_ignores_padding():
    """A small sample of the fidelity probe (bars over 16 pairs in docs/mini.md): the subject
    token's state decides what is drawn, and clean padding changes nothing."""
    import emcid
    from emcid.bench.judges import load_judge as load_bench_judge
    from emcid.bench.token_probe import probe
    from emcid.bench.worlds import world_for

    bundle = emcid.load_model(default_model_dir())
    classes = [c for c in world_for(bundle).classes if not c.holdout_only]
    _, means = probe(bundle, load_bench_judge(bundle), classes, pairs=6, images=2, seed=1)
    assert means["none"][0] >= 0.8
    assert means["subject"][1] >= 0.4 and means["subject"][1] > means["subject"][0]
    assert means["clean-pad"][0] >= 0.8
