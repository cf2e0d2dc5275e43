"""Stage I's ``distil_on``: the noise prediction loss noises the source's images (the
release), the destination's (drawn by the unedited model from the destination prompts), or
both, a row each; the result does not depend on the batch or on an interruption, and each
choice has its own cache key."""

import pytest
import torch
from edit_helpers import interrupt_at_the_end

import emcid
from emcid.cache import TensorCache
from emcid.config import Runtime
from emcid.core.tokens import subject_positions
from emcid.editors.emcid.stage1 import Stage1Config, compute_targets, objective, schedule
from emcid.editors.emcid.stage1.conditioning import prompt_tokens
from emcid.editors.emcid.stage1.latents import image_latents
from emcid.editors.emcid.stage1.start import record_block_outputs

REQUESTS = [emcid.EditRequest("tench", "goldfish"), emcid.EditRequest("zebra", "horse", seed=4)]
LAYER = {"text_encoder": 2}
BOTH = Stage1Config(steps=4, distil_on="both")


def _sides(sd1, cache: TensorCache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    config = Stage1Config(steps=4, distil_on="source")
    return (image_latents(sd1, REQUESTS, config, cache),
            image_latents(sd1, REQUESTS, config, cache, side="destination"))


def test_both_gives_each_prompt_a_source_row_and_a_destination_row(sd1):
    cache = TensorCache("images-both")
    batch = objective.layout(sd1, REQUESTS, LAYER, BOTH, cache)
    sources, destinations = _sides(sd1, cache)
    assert not torch.allclose(sources[0], destinations[0])  # the unedited model draws two things
    expected = torch.cat([side[i] for i in range(len(REQUESTS)) for side in (sources, destinations)])
    assert torch.equal(batch.latents, expected)
    rows = [(r.source_prompts() * 2, r.destination_prompts() * 2) for r in REQUESTS]
    assert batch.src_prompts == [p for src, _ in rows for p in src]  # the student reads the source
    assert batch.dst_prompts == [p for _, dst in rows for p in dst]  # the teacher the destination
    assert batch.owner.tolist() == [i for i, r in enumerate(REQUESTS) for _ in range(2 * len(r.prompts))]


def test_both_with_the_release_latents_draws_each_row_from_its_own_posterior(sd1):
    batch = objective.layout(sd1, REQUESTS, LAYER, Stage1Config(steps=4, distil_on="both", latents="release"),
                             TensorCache("images-both-release"))
    rows = sum(2 * len(r.prompts) for r in REQUESTS)
    assert batch.latents.shape[0] == batch.spread.shape[0] == rows
    first = len(REQUESTS[0].prompts)  # tench's source rows, then its destination rows
    assert not torch.allclose(batch.latents[:first], batch.latents[first:2 * first])


@pytest.mark.parametrize("side", ["source", "destination"])
def test_one_side_gives_a_row_per_prompt_of_its_images(sd1, side):
    cache = TensorCache(f"images-{side}")
    batch = objective.layout(sd1, REQUESTS, LAYER, Stage1Config(steps=4, distil_on=side), cache)
    sources, destinations = _sides(sd1, cache)
    assert torch.equal(batch.latents, torch.cat(sources if side == "source" else destinations))
    assert batch.src_prompts == [p for r in REQUESTS for p in r.source_prompts()]


@pytest.mark.parametrize("conditioning", ["pipeline", "release"])
def test_the_text_pass_runs_each_prompt_once_and_gives_every_row_its_encoding(sd1, conditioning):
    config = Stage1Config(steps=4, distil_on="both", conditioning=conditioning)
    batch = objective.layout(sd1, REQUESTS, LAYER, config, TensorCache(f"images-text-{conditioning}"))
    goal = objective.Objective.of(sd1, batch, LAYER, config, "fp32", graphs=False)
    assert len(goal.text.owner) == sum(len(r.prompts) for r in REQUESTS) == len(batch.owner) // 2
    # every row encoded on its own, block l*'s output recorded on every row
    tokens = prompt_tokens(sd1, conditioning, batch.src_prompts, batch.owner)
    prefix = record_block_outputs(sd1, LAYER, lambda: tokens.encode(sd1))
    positions = torch.cat([subject_positions(sd1.tokenizer, r.prompts, r.source).repeat(2) for r in REQUESTS])
    deltas = {"text_encoder": torch.randn(len(REQUESTS), sd1.text_encoder.config.hidden_size)}
    every_row = objective.encode_edited(sd1, tokens.ids, LAYER, prefix, {"text_encoder": positions},
                                        {"text_encoder": deltas["text_encoder"][batch.owner]}, tokens.masks)
    once = goal.edited(deltas)
    assert once.embeds.shape == every_row.embeds.shape
    assert torch.allclose(once.embeds, every_row.embeds, atol=1e-5)
    assert torch.allclose(once.pooled[0], every_row.pooled[0], atol=1e-5)
    if conditioning == "release":  # the UNet's key mask, every row its own
        assert torch.equal(goal.keys[0], tokens.keys)


def test_both_sides_move_the_targets_and_not_with_the_batch_or_an_interruption(sd1, monkeypatch):
    runtime = Runtime(checkpoint_every=3)
    together = compute_targets(sd1, REQUESTS, LAYER, BOTH, TensorCache("both-together"), progress=False,
                               runtime=runtime)
    alone = [compute_targets(sd1, [r], LAYER, BOTH, TensorCache(f"both-alone-{i}"), progress=False)[0]
             for i, r in enumerate(REQUESTS)]
    source = compute_targets(sd1, REQUESTS, LAYER, Stage1Config(steps=4, distil_on="source"),
                             TensorCache("source-only"), progress=False)
    cache = TensorCache("both-resumed")
    interrupt_at_the_end(sd1, REQUESTS, LAYER, BOTH, cache, runtime, monkeypatch)
    resumed = compute_targets(sd1, REQUESTS, LAYER, BOTH, cache, progress=False, runtime=runtime)
    for a, b, c, d in zip(together, alone, resumed, source, strict=True):
        assert torch.allclose(a.deltas["text_encoder"], b.deltas["text_encoder"], atol=1e-5)
        assert torch.equal(a.deltas["text_encoder"], c.deltas["text_encoder"])
        assert not torch.allclose(a.deltas["text_encoder"], d.deltas["text_encoder"])


def test_the_images_are_part_of_the_cache_key_and_a_bad_choice_is_refused():
    cpu = torch.device("cpu")
    keys = {side: schedule.cache_key_for("model", REQUESTS[0], LAYER, Stage1Config(steps=4, distil_on=side),
                                         {}, cpu) for side in ("source", "destination", "both")}
    assert len(set(keys.values())) == 3
    with pytest.raises(emcid.EmcidError, match="distil_on"):
        Stage1Config(distil_on="target")
