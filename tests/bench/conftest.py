"""Shared fixtures for the ICEB tests: a tiny SD-1.x model and a stand-in judge (test only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image


class FakeJudge:
    """TEST ONLY: a fixed random linear classifier on 4x4 thumbnails.

    It is deterministic and depends on the pixels, so edited images score differently from
    unedited ones; it knows nothing about ImageNet, so its numbers mean nothing.
    """

    def __init__(self, num_classes: int = 1000, seed: int = 0):
        self.class_names = [f"class {i}" for i in range(num_classes)]
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(num_classes, 48, generator=generator) * 4.0
        self.calls = 0

    def predict_proba(self, images: Sequence[Image.Image]) -> torch.Tensor:
        self.calls += 1
        if not images:
            return torch.zeros(0, len(self.class_names))
        thumbs = np.stack([np.asarray(i.convert("RGB").resize((4, 4), Image.BILINEAR), np.float32)
                           for i in images]) / 255.0
        features = torch.from_numpy(thumbs).reshape(len(images), -1) - 0.5
        return (features @ self.weight.T).softmax(-1)


@pytest.fixture()
def tiny_bundle(sd1_dir):
    """The suite's tiny random SD-1.x model (sd1_dir is shared from tests/conftest.py)."""
    import emcid

    return emcid.load_model(sd1_dir)


@pytest.fixture()
def fake_judge():
    return FakeJudge()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder, so no test sees another's cached images."""
    monkeypatch.setenv("EMCID_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture()
def fast_emcid():
    """Editor options that make EMCID run in CI time on the tiny model."""
    return {"steps": 2, "stats_samples": 64, "image_steps": 4}


@pytest.fixture(scope="session")
def make_tiny_clip(tmp_path_factory):
    """Builds a tiny random CLIP (text and vision towers) whose tokenizer knows ``words``, saved
    like a real one, for the benchmarks that judge with CLIP."""
    from emcid.tiny import save_tiny_clip

    def make(words: str):
        return save_tiny_clip(tmp_path_factory.mktemp("clip"), words.split())

    return make
