"""Stage II's ``destinations="keep"``: each edit's destination, in its edit's prompts, is held by
the closed form as an earlier batch's keys are, so it keeps drawing what Stage I distilled
towards; lam_edits does not count it."""

import copy

import pytest
import torch
from edit_helpers import block_output_at_subject

from emcid import EditRequest
from emcid.concepts import OBJECT_PROMPTS
from emcid.editors import editor_from_patch, get_editor
from emcid.editors.emcid.stage2 import held_destinations, names_source
from emcid.errors import OptionError
from emcid.tasks.edit import edit_patch

OPTIONS = {"layers": {"text_encoder": [1, 2]}, "stats_samples": 8, "cache": False, "steps": 2,
           "lam": 1.0, "lam_edits": 1}
REQUESTS = [EditRequest("lobster", "crab"), EditRequest("owl", "hawk", seed=3)]


def test_each_destination_is_held_once_unless_empty_edited_or_a_variant_of_its_source():
    requests = [EditRequest("tench", "goldfish"), EditRequest("zebra", "Goldfish"),  # once
                EditRequest("cat", "tench"),  # a source of the batch: edited, not held
                EditRequest("dog", "teal dog"),  # an attribute edit: the source in another context
                EditRequest("van gogh", ""),  # an erase with no destination word
                EditRequest("cat", "caterpillar", seed=1)]  # names no source as a word
    held = held_destinations([EditRequest("caterpillar", "moth"), *requests])  # an earlier batch's first
    assert [(r.source, r.destination, r.prompts) for r in held] == [("moth", "", OBJECT_PROMPTS),
                                                                    ("goldfish", "", requests[0].prompts)]
    assert held_destinations(requests[-1:]) == [EditRequest("caterpillar", "", requests[-1].prompts)]
    assert names_source(EditRequest("doctor", "a female Doctor"))
    assert not names_source(EditRequest("cat", "caterpillar"))


def _destination_change(sd1, patch) -> float:
    """How far the edit moves the destinations' block-2 states at their subject tokens."""
    moved = []
    for request in REQUESTS:
        before = block_output_at_subject(sd1, "text_encoder", 2, request.prompts, request.destination)
        with patch.applied(sd1):
            after = block_output_at_subject(sd1, "text_encoder", 2, request.prompts, request.destination)
        moved.append((after - before).norm() / before.norm())
    return float(torch.stack(moved).mean())


def test_keeping_the_destinations_moves_them_less_at_the_same_lam(sd1):
    kept = edit_patch(get_editor("emcid", sd1, **OPTIONS), sd1, REQUESTS, progress=False)
    free = edit_patch(get_editor("emcid", sd1, destinations="free", **OPTIONS), sd1, REQUESTS,
                      progress=False)
    assert kept.metadata["hparams"]["stage2"]["destinations"] == "keep"
    assert free.metadata["hparams"]["stage2"]["destinations"] == "free"
    assert kept.metadata["stage2_lam"] == free.metadata["stage2_lam"] == 2.0  # two edits, not four
    assert _destination_change(sd1, kept) < 0.8 * _destination_change(sd1, free)  # 0.37 vs 0.66 here
    # a patch written before the option was unguarded, and is rebuilt so
    assert editor_from_patch(kept).config.stage2.destinations == "keep"
    older = copy.deepcopy(kept.metadata)
    del older["hparams"]["stage2"]["destinations"]
    assert editor_from_patch(older).config.stage2.destinations == "free"


def test_the_release_profile_and_memit_leave_destinations_free_and_a_bad_choice_is_refused(sd1):
    assert get_editor("emcid", sd1, profile="release").config.stage2.destinations == "free"
    assert get_editor("memit", sd1).config.stage2.destinations == "free"
    with pytest.raises(OptionError, match="destinations"):
        get_editor("emcid", sd1, destinations="hold")
