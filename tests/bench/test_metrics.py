"""ICEB metrics against values computed by hand on fixed probability tables."""

import pytest
import torch

from emcid.bench import metrics
from emcid.bench.metrics import ImageGroup
from emcid.bench.scoring import EditItem, scale_metrics
from emcid.requests import EditRequest

# Three images, three classes.
PRE = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.4, 0.2], [0.2, 0.2, 0.6]])
POST = torch.tensor([[0.1, 0.8, 0.1], [0.2, 0.5, 0.3], [0.2, 0.1, 0.7]])
A = ImageGroup("a", (0, 1), source=0, destination=1)
B = ImageGroup("b", (2,), source=2, destination=0)


def test_source_forget_by_hand():
    # a: mean pre P(0) = 0.5, post = 0.15 -> 0.35; b: pre P(2) = 0.6, post 0.7 -> -0.1
    result = metrics.source_forget(PRE, POST, [A, B])
    assert result.per_class == pytest.approx({"a": 0.35, "b": -0.1})
    assert result.value == pytest.approx(0.125)


def test_source2dest_by_hand():
    # a: post P(1) = 0.65, pre 0.35 -> 0.30; b: post P(0) = 0.2, pre 0.2 -> 0
    result = metrics.source2dest(PRE, POST, [A, B])
    assert result.per_class == pytest.approx({"a": 0.30, "b": 0.0})
    assert result.value == pytest.approx(0.15)


def test_holdout_delta_by_hand():
    holdout = [ImageGroup("x", (2,), source=2), ImageGroup("y", (0, 1), source=1)]
    # x: 0.7 - 0.6 = 0.1; y: 0.65 - 0.35 = 0.3
    result = metrics.holdout_delta(PRE, POST, holdout)
    assert result.per_class == pytest.approx({"x": 0.1, "y": 0.3})
    assert result.value == pytest.approx(0.2)


def test_own_class_score_and_empty_inputs():
    assert metrics.own_class_score(PRE, [A]).value == pytest.approx(0.5)
    assert metrics.source_forget(PRE, POST, []).value is None
    with pytest.raises(ValueError):
        metrics.mean_probability(PRE, (), 0)
    with pytest.raises(ValueError):
        metrics.source2dest(PRE, POST[:2], [A])


def test_scale_metrics_combines_groups():
    pre = torch.cat([PRE, PRE])
    post = torch.cat([POST, POST])
    item = EditItem(EditRequest("tench", "goldfish"), 0, 1, efficacy=A,
                    generalization=ImageGroup("a", (3, 4), 0, 1), aliases=[])
    holdout = [ImageGroup("x", (5,), source=2)]
    result = scale_metrics(pre, post, [item], holdout)
    assert result["source_forget_efficacy"] == pytest.approx(0.35)
    assert result["source2dest_generalization"] == pytest.approx(0.30)
    assert result["alias2dest"] is None  # no aliases: no value rather than a made-up zero
    assert result["holdout_delta"] == pytest.approx(0.1)
    assert result["scores"]["pre_destination_efficacy"] == pytest.approx(0.35)
    assert result["per_class"]["source2dest_efficacy"] == pytest.approx({"a": 0.30})
