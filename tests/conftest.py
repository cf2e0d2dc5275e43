"""Shared fixtures: tiny random SD-1.x and SDXL pipelines saved and loaded like real ones."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Every test session gets its own cache folder (no stale entries from the user's)."""
    folder = tmp_path_factory.mktemp("emcid-cache")
    previous = os.environ.get("EMCID_CACHE")
    os.environ["EMCID_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("EMCID_CACHE", None)
    else:
        os.environ["EMCID_CACHE"] = previous


@pytest.fixture(scope="session")
def sd1_dir(tmp_path_factory):
    from emcid.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-sd1"), "sd1")


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    from emcid.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-sdxl"), "sdxl")


@pytest.fixture
def sd1(sd1_dir):
    """A freshly loaded tiny SD-1.x bundle (tests may modify its weights)."""
    from emcid import load_model

    return load_model(sd1_dir)


@pytest.fixture
def sdxl(sdxl_dir):
    from emcid import load_model

    return load_model(sdxl_dir)

