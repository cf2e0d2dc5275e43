"""Every file in examples/ is what the README says it is: requests that load, options that build."""

from pathlib import Path

import pytest

import emcid
from emcid.config import read_config_file
from emcid.editors import get_editor

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["requests.yaml", "erase.yaml", "artists.yaml"])
def test_request_examples_load(name):
    requests = emcid.load_requests(EXAMPLES / name)
    assert requests and all(isinstance(r, emcid.EditRequest) for r in requests)


def test_artist_example_takes_the_artist_prompts_from_the_task(sd1):
    requests = emcid.load_requests(EXAMPLES / "artists.yaml")
    editor = get_editor("emcid", sd1, task="artist")
    prepared = editor.prepare(requests, sd1)
    assert all(r.prompts[:3] == ("painting by {}", "artwork by {}", "style of {}") for r in prepared)
    assert all(len(r.prompts) == 7 and r.prompts[-1].endswith(" in the style of {}") for r in prepared)


def test_options_example_builds_an_editor():
    options = read_config_file(EXAMPLES / "options.yaml")
    editor = get_editor("emcid", **options)
    assert editor.config.stage1.steps == options["steps"] and editor.config.stage1.init == "text"
    assert editor.config.stage2.lam == options["lam"]
