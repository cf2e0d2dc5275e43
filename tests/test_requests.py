import json

import pytest

from emcid import EditRequest, load_requests
from emcid.errors import RequestError
from emcid.requests import save_requests, subject_positions, validate_requests


def test_defaults_and_prompts():
    request = EditRequest("  tench ", "goldfish")
    assert request.source == "tench"
    assert request.source_prompts() == ["An image of tench", "A photo of tench", "tench"]
    assert request.destination_prompts()[0] == "An image of goldfish"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"source": "", "destination": "x"}, "empty source"),
        ({"source": "Tench", "destination": "tench"}, "nothing to edit"),
        ({"source": "a", "destination": "b", "prompts": ("no slot",)}, "exactly once"),
        ({"source": "a", "destination": "b", "prompts": ()}, "no prompts"),
    ],
)
def test_bad_requests_are_refused(kwargs, message):
    with pytest.raises(RequestError, match=message):
        EditRequest(**kwargs)


def test_conflicting_destinations_refused():
    with pytest.raises(RequestError, match="edited twice"):
        validate_requests([EditRequest("a", "b"), EditRequest("A", "c")])


def test_chain_refused():
    with pytest.raises(RequestError, match="chain"):
        validate_requests([EditRequest("a", "b"), EditRequest("b", "c")])


def test_exact_duplicates_dropped():
    assert len(validate_requests([EditRequest("a", "b"), EditRequest("a", "b")])) == 1


def test_load_yaml_json_csv(tmp_path):
    requests = [EditRequest("tench", "goldfish", seed=3), EditRequest("zebra", "horse", ("a {}",))]
    save_requests(requests, tmp_path / "r.yaml")
    save_requests(requests, tmp_path / "r.json")
    (tmp_path / "r.csv").write_text("source,destination,prompts,seed\ntench,goldfish,,3\nzebra,horse,a {},\n")
    for name in ("r.yaml", "r.json", "r.csv"):
        assert load_requests(tmp_path / name) == requests
    (tmp_path / "w.json").write_text(json.dumps({"requests": [{"source": "a", "destination": "b"}]}))
    assert load_requests(tmp_path / "w.json") == [EditRequest("a", "b")]


def test_load_errors(tmp_path):
    with pytest.raises(RequestError, match="does not exist"):
        load_requests(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("- source: a\n  destination: b\n  colour: red\n")
    with pytest.raises(RequestError, match="unknown request fields"):
        load_requests(tmp_path / "bad.yaml")
    (tmp_path / "r.txt").write_text("x")
    with pytest.raises(RequestError, match=".yaml"):
        load_requests(tmp_path / "r.txt")


def test_reference_images_relative_to_file(tmp_path):
    (tmp_path / "r.yaml").write_text("- {source: a, destination: b, reference_images: [img/x.png]}\n")
    (request,) = load_requests(tmp_path / "r.yaml")
    assert request.reference_images == (str(tmp_path / "img/x.png"),)


def test_subject_positions_multi_token(sd1):
    tokenizer = sd1.tokenizer
    templates = ["A photo of {}.", "{}", "{} in a field"]
    positions = subject_positions(tokenizer, templates, "great white shark")
    for template, position in zip(templates, positions.tolist()):
        ids = tokenizer(template.format("great white shark")).input_ids
        assert position < len(ids) - 1  # never the end-of-text token
        # the subject spans several tokens of the tiny vocabulary; the last one ends it
        upto = tokenizer.decode(ids[: position + 1], skip_special_tokens=True)
        assert upto.rstrip().endswith("great white shark")
        assert not tokenizer.decode(ids[:position], skip_special_tokens=True).rstrip().endswith("shark")


def test_subject_beyond_window_refused(sd1):
    long_template = "a " * 80 + "{}"
    with pytest.raises(RequestError, match="token window"):
        subject_positions(sd1.tokenizer, [long_template], "tench")
