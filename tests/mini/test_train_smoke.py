"""A few-step run of `emcid mini train` and what it exports."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

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


def test_smoke_training_refuses_to_mix_runs(smoke_run):
    from emcid.mini import train

    with pytest.raises(FileExistsError):
        train.train_mini(smoke_run, train.MiniTrainConfig())
    assert (smoke_run / "work" / "unet" / "DONE").exists()


def test_unet_stage_paused_by_max_minutes_resumes_bit_exactly(smoke_run, smoke_config, tmp_path):
    """A run stopped by max_minutes is not marked done, and --resume ends where one run ends."""
    from emcid.mini import train

    earlier = ("tokenizer", "text_encoder", "vae", "judge", "conditioning")
    train.copy_stages(tmp_path / "work", smoke_run / "work", earlier)
    paused = dataclasses.replace(smoke_config, max_minutes=0.0)
    train.train_mini(tmp_path, paused, resume=True)
    state = torch.load(tmp_path / "work" / "unet" / "state.pt", weights_only=True)
    assert state["step"] == 1 and not (tmp_path / "work" / "unet" / "DONE").exists()
    train.train_mini(tmp_path, smoke_config, resume=True)
    resumed = load_file(tmp_path / "work" / "unet" / "ema" / "diffusion_pytorch_model.safetensors")
    whole = load_file(smoke_run / "work" / "unet" / "ema" / "diffusion_pytorch_model.safetensors")
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    done = json.loads((tmp_path / "work" / "unet" / "DONE").read_text())
    assert done["steps"] == smoke_config.unet_steps


def test_text_encoder_stores_float16_and_loads_float32(smoke_run):
    from safetensors import safe_open
    from transformers import CLIPTextModel

    folder = smoke_run / "pipeline" / "text_encoder"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert CLIPTextModel.from_pretrained(folder).dtype == torch.float32


def test_conditioning_augmentation_replaces_only_the_chosen_positions():
    from emcid.mini.train import ConditioningBank, MiniTrainConfig, augment_conditioning

    rows, length, width = 256, 8, 4
    states = torch.arange(1, rows + 1, dtype=torch.float16)[:, None, None].expand(rows, length, width)
    bank = ConditioningBank(
        states=states.contiguous(), subject_pos=torch.full((rows,), 2), eos_pos=torch.full((rows,), 4),
        clean=torch.zeros(length, width), per_concept=1,
    )  # fmt: skip
    cfg = MiniTrainConfig(after_subject_clean_rate=0.3, after_subject_conflict_rate=0.3,
                          padding_clean_rate=0.2, uncond_prob=0.0, conflict_from="subject")  # fmt: skip
    index = torch.arange(rows)
    cond = augment_conditioning(bank, index, cfg, torch.Generator().manual_seed(0))
    own = cond[..., 0] == (index + 1)[:, None].float()
    assert own[:, :3].all(), "the prompt's tokens up to the subject are never replaced"
    cleaned = (cond[..., 0] == 0).sum(-1)
    foreign = (~own & (cond[..., 0] != 0)).sum(-1)  # another prompt's states
    kinds = {(int(c), int(f)) for c, f in zip(cleaned, foreign)}
    assert kinds <= {(5, 0), (3, 0), (0, 0), (0, 5)}  # clean after subject / padding, none, conflict
    assert kinds >= {(5, 0), (3, 0), (0, 0)} and any(f > 0 for _, f in kinds)
    dropped = augment_conditioning(bank, index, dataclasses.replace(cfg, uncond_prob=1.0),
                                   torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.all(dropped == 0)


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


def test_end_of_text_conflict_takes_another_prompt_from_its_end_of_text_on():
    from emcid.mini.train import ConditioningBank, MiniTrainConfig, augment_conditioning

    rows, length = 16, 8  # states up to 1,507: exact in float16
    states = torch.arange(length, dtype=torch.float16)[None, :, None] + 100 * torch.arange(
        rows, dtype=torch.float16)[:, None, None]  # state = 100 * row + position
    eos = torch.arange(rows) % 3 + 2  # ends of text at 2, 3 or 4
    bank = ConditioningBank(states=states.expand(rows, length, 2).contiguous(),
                            subject_pos=eos - 1, eos_pos=eos, clean=torch.full((length, 2), -1.0),
                            per_concept=1)  # fmt: skip
    cfg = MiniTrainConfig(after_subject_clean_rate=0.0, after_subject_conflict_rate=1.0,
                          padding_clean_rate=0.0, uncond_prob=0.0, conflict_from="end_of_text")
    cond = augment_conditioning(bank, torch.arange(rows), cfg, torch.Generator().manual_seed(0))[..., 0]
    for row in range(rows):
        own_eos = int(eos[row])
        assert torch.equal(cond[row, :own_eos], states[row, :own_eos, 0].float())  # prompt kept
        other, position = divmod(int(cond[row, own_eos]), 100)
        assert position == int(eos[other])  # the other prompt's end of text lands on ours


def test_unet_warm_start_copies_weights_and_refuses_other_shapes(smoke_run, smoke_config, tmp_path):
    from emcid.mini import train
    from emcid.mini.build import build_unet

    folder = smoke_run / "work" / "unet" / "ema"
    trained = load_file(folder / "diffusion_pytorch_model.safetensors")
    torch.manual_seed(123)
    fresh = build_unet(smoke_config.unet_channels, 128, smoke_config.vae_latent_channels)
    assert not all(torch.equal(fresh.state_dict()[k], trained[k]) for k in trained)
    train.warm_start(fresh, folder)
    assert all(torch.equal(fresh.state_dict()[k], trained[k]) for k in trained)
    narrower = build_unet((16, 32, 32), 128, smoke_config.vae_latent_channels)
    with pytest.raises(ValueError, match="shape differs"):
        train.warm_start(narrower, folder)
    with pytest.raises(FileNotFoundError, match="not a diffusers UNet folder"):
        train.warm_start(narrower, tmp_path)


def test_augmentation_rates_must_fit_in_one():
    from emcid.mini.train import MiniTrainConfig

    with pytest.raises(ValueError, match="sum to at most 1"):
        MiniTrainConfig(after_subject_clean_rate=0.5, after_subject_conflict_rate=0.5,
                        padding_clean_rate=0.2)  # fmt: skip


def test_text_stage_reports_the_subject_marker_and_fine_tunes_from_init(smoke_run, smoke_config,
                                                                        tmp_path):  # fmt: skip
    """The subject-marking head is trained and probed; --text-init starts from given weights."""
    from emcid.mini import train

    probe = json.loads((smoke_run / "work" / "text_encoder" / "DONE").read_text())["probe"]
    assert 0.0 <= probe["edit_templates_marker"] <= 1.0
    source = smoke_run / "work" / "text_encoder"
    text = dataclasses.replace(smoke_config.text, steps=0, init_from=str(source))
    cfg = dataclasses.replace(smoke_config, text=text)
    train.copy_stages(tmp_path / "work", smoke_run / "work", ("tokenizer",))
    tok = train.stage_tokenizer(tmp_path / "work", cfg)
    model = train.stage_text_encoder(tmp_path / "work", cfg, tok)
    original = load_file(source / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k].half(), original[k]) for k in original)


def test_warm_starts_that_do_not_fit_are_refused_before_training(smoke_run, smoke_config, tmp_path):
    """--text-init must fit the tokenizer and the text settings; --unet-init is checked before
    any stage runs (nothing is written)."""
    from emcid.errors import OptionError
    from emcid.mini import train

    source = smoke_run / "work" / "text_encoder"
    deeper = dataclasses.replace(smoke_config.text, steps=0, init_from=str(source), num_hidden_layers=3)
    train.copy_stages(tmp_path / "work", smoke_run / "work", ("tokenizer",))
    tok = train.stage_tokenizer(tmp_path / "work", smoke_config)
    with pytest.raises(OptionError, match="num_hidden_layers 2 \\(expected 3\\)"):
        train.stage_text_encoder(tmp_path / "work", dataclasses.replace(smoke_config, text=deeper), tok)
    with pytest.raises(FileNotFoundError, match="not a CLIPTextModel folder"):
        train.stage_text_encoder(tmp_path / "work", dataclasses.replace(
            smoke_config, text=dataclasses.replace(deeper, init_from=str(tmp_path))), tok)
    wide = dataclasses.replace(smoke_config, unet_init=str(smoke_run / "work" / "unet" / "ema"),
                               unet_channels=(16, 32, 32))
    with pytest.raises(OptionError, match="shape differs"):
        train.train_mini(tmp_path / "early", wide)
    assert not (tmp_path / "early").exists()


def test_subject_marker_scores_pick_the_subject_position():
    from emcid.mini.text_encoder import SubjectMarker

    marker = SubjectMarker(4)
    with torch.no_grad():
        marker.score.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
        marker.score.bias.zero_()
    hidden = torch.zeros(2, 5, 4)
    hidden[0, 3, 0] = hidden[1, 1, 0] = 5.0
    loss, correct = marker.loss_and_correct(hidden, torch.tensor([3, 2]))
    assert correct.tolist() == [True, False]
    assert float(loss.detach()) > 0
