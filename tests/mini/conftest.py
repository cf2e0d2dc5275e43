"""Fixtures of the mini-world tests: one tokenizer and one smoke-trained model per session."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def concepts():
    from emcid.mini import world

    return world.load_concepts()


@pytest.fixture(scope="session")
def trained_tokenizer(tmp_path_factory):
    from emcid.mini.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("mini-tokenizer")
    train_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def smoke_config():
    """A CI-sized configuration of `emcid mini train` (every stage, a few steps each)."""
    from emcid.mini import train
    from emcid.mini.judge import JudgeConfig
    from emcid.mini.text_encoder import TextEncoderConfig

    return train.MiniTrainConfig(
        text=TextEncoderConfig(steps=3, batch_size=16, intermediate_size=256, num_hidden_layers=2),
        prompts_per_concept=1,
        judge=JudgeConfig(steps=3, batch_size=16),
        vae_steps=3,
        vae_batch=8,
        unet_steps=3,
        unet_batch=8,
        n_variants=1,
        eval_every=0,
    )


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, smoke_config):
    """A few-step run of every stage of `emcid mini train` (CI-sized)."""
    from emcid.mini import train

    out = tmp_path_factory.mktemp("mini-smoke")
    train.train_mini(out, smoke_config)
    return out
