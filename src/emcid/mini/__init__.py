"""The embedded default model: a 2,000-concept procedural world, a small SD-1.x-shaped
pipeline trained on it, and the world's judge (docs/mini.md).

`default_model_dir()` is the folder `emcid` loads when no `--model` is given.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["default_model_dir", "default_judge_dir", "tasks_dir", "weights_present"]

_WEIGHTS = Path(__file__).resolve().parent / "weights"


def default_model_dir() -> Path:
    """The shipped StableDiffusionPipeline folder (safetensors + emcid.json)."""
    return _WEIGHTS / "pipeline"


def default_judge_dir() -> Path:
    """The shipped judge folder (judge.safetensors + config.json)."""
    return _WEIGHTS / "judge"


def tasks_dir() -> Path:
    """The parts of the model that also draws words of the world's task vocabulary
    (``emcid.models.EMBEDDED_TASKS``): ``unet/``, optionally ``text_encoder/``, and
    ``tasks.json`` (what it draws); the VAE, tokenizer and judge are the default model's."""
    return _WEIGHTS / "tasks"


def weights_present() -> bool:
    """Whether the shipped pipeline and judge are both on disk (tests skip otherwise)."""
    return (default_model_dir() / "model_index.json").exists() and (
        default_judge_dir() / "judge.safetensors"
    ).exists()
