"""ICEB metrics: differences of mean judge probabilities, pre vs. post edit (docs/method.md section 6).

Every metric is computed per class first and then averaged, so the per-class values are
kept for the report and for later analysis. Inputs are probability tables
``(n_images, n_classes)`` of the unedited (pre) and edited (post) model on the *same*
prompts and seeds; an :class:`ImageGroup` names the rows of one edit (or one holdout class)
and which judge classes matter for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ImageGroup:
    """Rows of the probability tables that belong to one edit or one holdout class."""

    key: str  # what the per-class values are reported under (e.g. the source name)
    rows: tuple[int, ...]
    source: int  # judge class of the source (of the class itself, for holdout groups)
    destination: int = -1  # judge class of the destination; -1 for holdout groups


@dataclass
class Metric:
    """A mean over classes plus the per-class values it averages."""

    value: float | None
    per_class: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"value": self.value, "per_class": self.per_class}


def mean_probability(probs: torch.Tensor, rows: Sequence[int], cls: int) -> float:
    """The judge's mean probability of class ``cls`` over the given images."""
    if not rows:
        raise ValueError("an image group has no images")
    return float(probs[list(rows), cls].double().mean())


def _average(per_class: dict[str, float]) -> Metric:
    value = sum(per_class.values()) / len(per_class) if per_class else None
    return Metric(value, per_class)


def _check(pre: torch.Tensor, post: torch.Tensor) -> None:
    if pre.shape != post.shape:
        raise ValueError(f"pre and post tables differ in shape: {tuple(pre.shape)} vs {tuple(post.shape)}")


def source_forget(pre: torch.Tensor, post: torch.Tensor, groups: Sequence[ImageGroup]) -> Metric:
    """P_pre(src) - P_post(src) on source-prompt images: how much the source is forgotten."""
    _check(pre, post)
    return _average({g.key: mean_probability(pre, g.rows, g.source) - mean_probability(post, g.rows, g.source)
                     for g in groups})


def source2dest(pre: torch.Tensor, post: torch.Tensor, groups: Sequence[ImageGroup]) -> Metric:
    """P_post(dst) - P_pre(dst) on source-prompt images: how much the source became the destination."""
    _check(pre, post)
    return _average({g.key: mean_probability(post, g.rows, g.destination)
                     - mean_probability(pre, g.rows, g.destination) for g in groups})


def holdout_delta(pre: torch.Tensor, post: torch.Tensor, groups: Sequence[ImageGroup]) -> Metric:
    """Mean over holdout classes of P_post(own) - P_pre(own): what the edit broke elsewhere."""
    _check(pre, post)
    return _average({g.key: mean_probability(post, g.rows, g.source) - mean_probability(pre, g.rows, g.source)
                     for g in groups})


def own_class_score(probs: torch.Tensor, groups: Sequence[ImageGroup]) -> Metric:
    """Mean P(own class) of each group on one table: how well a model draws each class."""
    return _average({g.key: mean_probability(probs, g.rows, g.source) for g in groups})
