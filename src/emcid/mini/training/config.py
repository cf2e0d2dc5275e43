"""The settings of `emcid mini train`, with the defaults that built the shipped model."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import judge as judge_mod
from .. import style_encoder as style_mod
from .. import text_encoder as te_mod
from ..build import SamplingDefaults

#: Stages that `--reuse-from` may copy from an earlier run (they do not depend on the text side).
REUSABLE_STAGES = ("vae", "judge")


@dataclass
class MiniTrainConfig:
    """Everything `emcid mini train` does, with the defaults that built the shipped model."""

    seed: int = 0
    vocab_size: int = 4096
    text: te_mod.TextEncoderConfig = field(default_factory=te_mod.TextEncoderConfig)
    style: style_mod.StyleTuneConfig = field(default_factory=style_mod.StyleTuneConfig)
    judge: judge_mod.JudgeConfig = field(default_factory=judge_mod.JudgeConfig)
    vae_channels: tuple[int, ...] = (16, 32, 32)
    vae_latent_channels: int = 8
    vae_steps: int = 2500
    vae_batch: int = 16  # many small steps converge much faster than few large ones
    vae_lr: float = 2e-3
    prompts_per_concept: int = 16  # size of the cached conditioning bank per concept
    neutral_rate: float = 0.01  # share of UNet samples showing the neutral (empty) canvas
    unet_channels: tuple[int, ...] = (32, 96, 96)
    unet_steps: int = 6000
    unet_batch: int = 64
    unet_lr: float = 6e-4
    unet_init: str | None = None  # a diffusers UNet folder of the same shape to start from
    uncond_prob: float = 0.1  # classifier-free guidance dropout
    after_subject_clean_rate: float = 0.3  # states after the subject -> the empty prompt's
    after_subject_conflict_rate: float = 0.3  # states after the subject -> another prompt's
    conflict_from: str = "end_of_text"  # or "subject": every state after the subject (recipe B)
    padding_clean_rate: float = 0.2  # states after the end of text -> the empty prompt's
    task_rate: float = 0.0  # share of each UNet batch from the task bank (styles, colour words)
    task_examples: int = 32768  # rows of the task bank
    task_mix: tuple[float, float, float] = (0.35, 0.4, 0.25)  # style alone / object in a style / colour word
    ema_decay: float = 0.999
    n_variants: int = 16  # renders per concept in the latent bank
    eval_every: int = 1000
    eval_concepts: int = 200
    checkpoint_minutes: float = 5.0
    max_minutes: float | None = None  # wall-clock cap of the UNet stage (None: run all steps)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)

    def __post_init__(self) -> None:
        rates = (self.after_subject_clean_rate, self.after_subject_conflict_rate,
                 self.padding_clean_rate)  # fmt: skip
        if min(rates) < 0 or sum(rates) > 1:
            raise ValueError(f"UNet augmentation rates must be >= 0 and sum to at most 1, got {rates}")
        if not 0 <= self.task_rate < 1:
            raise ValueError(f"task_rate must be in [0, 1), got {self.task_rate}")
        if len(self.task_mix) != 3 or min(self.task_mix) < 0 or sum(self.task_mix) <= 0:
            raise ValueError(f"task_mix must be three non-negative shares, got {self.task_mix}")

    def draws(self) -> list[str]:
        """What the UNet learns to draw beyond the world's objects (recorded in emcid.json)."""
        if not self.task_rate:
            return []
        alone, styled, colour = self.task_mix
        return (["styles"] if alone + styled else []) + (["colour_words"] if colour else [])
