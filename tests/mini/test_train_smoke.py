"""A few-step run of `emcid mini train` and what it exports."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from emcid.mini.judge import load_judge


def test_smoke_training_exports_a_stock_pipeline(smoke_run):
    folder = smoke_run / "pipeline"
    settings = json.loads((folder / "emcid.json").read_text())
    assert {"num_inference_steps", "guidance_scale", "height", "width"} <= set(settings)
    assert isinstance(settings["num_inference_steps"], int)
    assert isinstance(settings["guidance_scale"], float)
    assert not list(folder.rglob("*.bin")), "weights must be safetensors"
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.clip_sample is False
    te = pipe.text_encoder.config
    tok = pipe.tokenizer
    assert (te.bos_token_id, te.eos_token_id, te.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)  # fmt: skip
    assert te.max_position_embeddings >= tok.model_max_length
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["A photo of tench", "goldfish"], num_inference_steps=2, guidance_scale=2.0,
               height=settings["height"], width=settings["width"],
               generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip
    assert out.images.shape == (2, settings["height"], settings["width"], 3)


def test_smoke_training_resumes_and_refuses_to_mix(smoke_run):
    from emcid.mini import train

    with pytest.raises(FileExistsError):
        train.train_mini(smoke_run, train.MiniTrainConfig())
    assert (smoke_run / "work" / "unet" / "DONE").exists()


def test_smoke_judge_loads(smoke_run):
    judge = load_judge(folder=smoke_run / "judge")
    from emcid.mini import world

    probs = judge.predict_proba([world.render(0, 0), world.render(1, 0)])
    assert probs.shape == (2, 2000)
    assert torch.allclose(probs.sum(-1), torch.ones(2), atol=1e-4)
    assert len(judge.class_names) == 2000 and judge.class_names[0] == "tench"


def test_cli_registers_mini_group():
    import argparse

    from emcid.mini.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["mini", "train", "--out", "x", "--seed", "3", "--resume"])
    assert args.seed == 3 and args.resume and args.func.__name__ == "cmd_train"


def test_smoke_pipeline_tokenizer_is_clip_format(smoke_run):
    folder = smoke_run / "pipeline" / "tokenizer"
    assert (folder / "vocab.json").exists() and (folder / "merges.txt").exists()
    assert not (folder / "tokenizer.json").exists()
