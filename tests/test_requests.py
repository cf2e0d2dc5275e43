import json
import re

import pytest
from input_helpers import alias_bomb, png, png_bomb

from emcid import EditRequest, load_requests
from emcid.errors import RequestError
from emcid.requests import parse_requests, save_requests, subject_positions, validate_requests


def test_defaults_and_prompts():
    request = EditRequest("  tench ", "goldfish")
    assert request.source == "tench"
    assert request.source_prompts() == ["An image of tench", "A photo of tench", "tench"]
    assert request.destination_prompts()[0] == "An image of goldfish"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"source": "", "destination": "x"}, "empty source"),
        ({"source": "x", "destination": None}, "destination is missing"),
        ({"source": True, "destination": "x"}, "boolean True"),
        ({"source": ["a", "b"], "destination": "x"}, "must be text, not the list"),
        ({"source": "a", "destination": "b", "seed": 1.7}, "whole number, not 1.7"),
        ({"source": "a", "destination": "b", "seed": True}, "whole number, not True"),
        ({"source": "a", "destination": "b", "seed": -1}, "outside"),
        ({"source": "a", "destination": "b", "prompts": ("a {name} {}",)}, "other than one"),
        ({"source": "a", "destination": "b", "prompts": ("a {} {}",)}, "other than one"),
        ({"source": "a", "destination": "b", "prompts": ("a {",)}, "Single '{'"),
        ({"source": "Tench", "destination": "tench"}, "nothing to edit"),
        ({"source": "a", "destination": "b", "prompts": ("no slot",)}, "exactly once"),
        ({"source": "a", "destination": "b", "prompts": ()}, "no prompts"),
    ],
)
def test_bad_requests_are_refused(kwargs, message):
    with pytest.raises(RequestError, match=message):
        EditRequest(**kwargs)


def test_empty_destination_is_an_erase():
    erase = EditRequest("tench", "")
    assert erase.is_erase and erase.destination == ""
    assert not EditRequest("tench", "goldfish").is_erase


@pytest.mark.parametrize("source, destination, message", [
    ("\x00", "goldfish", r"source '\\x00' is only invisible or control characters \(U\+0000\)"),
    (" \u200b ", "goldfish", r"source '\\u200b' is only invisible .*\(U\+200B\)"),
    ("\u200b\u2060\x7f", "goldfish", r"\(U\+007F, U\+200B, U\+2060\)"),
    ("tench", "\u200b", r"the destination of 'tench' '\\u200b' is only invisible"),
    ("tench", "   ", r"the destination of 'tench' is only white space \(3 characters: U\+0020\): an "
                     r'erase is written as an empty destination, ""'),
    ("tench", "\t\u3000", "the destination of 'tench' is only white space"),
])
def test_text_with_nothing_visible_is_refused(source, destination, message):
    with pytest.raises(RequestError, match=message):
        EditRequest(source, destination)
    assert EditRequest("tench\u200bfish", "goldfish").source == "tench\u200bfish"  # visible text: kept


def test_literal_braces_locate_the_subject(sd1):
    request = EditRequest("tench", "goldfish", prompts=("{{x}} a {}",))
    assert request.source_prompts() == ["{x} a tench"]
    (position,) = subject_positions(sd1.tokenizer, request.prompts, "tench").tolist()
    ids = sd1.tokenizer("{x} a tench").input_ids
    assert sd1.tokenizer.decode(ids[: position + 1], skip_special_tokens=True).endswith("tench")


@pytest.mark.parametrize("second", [
    EditRequest("tench", "goldfish", seed=4),
    EditRequest("Tench", "goldfish"),
    EditRequest("tench", "goldfish", prompts=("a {}",)),
])
def test_same_source_twice_refused_naming_both(second):
    with pytest.raises(RequestError, match="request 1 and request 3 both edit 'tench'"):
        validate_requests([EditRequest("tench", "goldfish"), EditRequest("zebra", "horse"), second])


def test_conflicting_destinations_refused():
    with pytest.raises(RequestError, match="edited twice"):
        validate_requests([EditRequest("a", "b"), EditRequest("A", "c")])


def test_chain_refused():
    with pytest.raises(RequestError, match="chain: 'a' -> 'b' -> 'c' -> 'd' .*write 'a' -> 'd'"):
        validate_requests([EditRequest("a", "b"), EditRequest("c", "d"), EditRequest("b", "c")])


@pytest.mark.parametrize("pairs, cycle, where", [
    ([("tench", "goldfish"), ("Goldfish", "tench")], "'tench' -> 'Goldfish' -> 'tench'",
     "request 1; request 2"),
    ([("a", "b"), ("b", "c"), ("c", "a")], "'a' -> 'b' -> 'c' -> 'a'", "request 1; request 2; request 3"),
    ([("x", "b"), ("b", "c"), ("c", "b")], "'b' -> 'c' -> 'b'", "request 2; request 3"),
])
def test_cycles_are_refused_naming_the_cycle(pairs, cycle, where):
    with pytest.raises(RequestError, match=re.escape(f"cycle {cycle} ({where})")) as info:
        validate_requests([EditRequest(s, d) for s, d in pairs])
    assert "write" not in str(info.value)


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


@pytest.mark.parametrize("text, message", [
    ("- {source: zebra, destination: }\n", r"r.yaml:1: request 1: destination is missing or null"),
    ("- {source: a, destination: b}\n- source: zebra\n", r"r.yaml:2: request 2: destination is missing"),
    ("- {source: a, destination: yes}\n", "request 1: destination is the boolean True"),
    ("- {source: no, destination: b}\n", "request 1: source is the boolean False"),
    ("- {source: [a, b], destination: c}\n", "request 1: source must be text, not the list"),
    ("- {source: a, destination: b, seed: 1.7}\n", "request 1: seed must be a whole number"),
    ("- {source: a, destination: b, seed: true}\n", "request 1: seed must be a whole number"),
    ("- {source: a, destination: b, prompts: 'a {}'}\n- {source: c, destination: d, "
     "prompts: ['a {name} {}']}\n", r"r.yaml:2: request 2: prompt 'a \{name\} \{\}'"),
    ("- {source: a, destination: b}\n-\n  source: A\n  destination: b\n  seed: 3\n",
     r"r.yaml:1: request 1 and .*r.yaml:3: request 2 both edit 'a'"),
    ("- {source: a, destination: b\n- {source: c}\n", r"r.yaml:2: malformed YAML"),
    ("- source: a\n  destination: b\n - x\n", r"r.yaml:3: malformed YAML"),
])
def test_yaml_errors_name_file_and_line(tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RequestError, match=message) as info:
        load_requests(tmp_path / "r.yaml")
    assert "\n" not in str(info.value)


def test_yaml_explicit_empty_destination_is_an_erase(tmp_path):
    (tmp_path / "r.yaml").write_text('- {source: zebra, destination: ""}\n')
    (request,) = load_requests(tmp_path / "r.yaml")
    assert request.is_erase
    save_requests([request], tmp_path / "back.yaml")
    assert load_requests(tmp_path / "back.yaml") == [request]


def test_csv_missing_field_and_erase(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("source,destination,seed\ntench,goldfish,1\nzebra\n")
    with pytest.raises(RequestError, match=r"r.csv:3: request 2: destination is missing"):
        load_requests(path)
    path.write_text("source,destination,seed\ntench,,1\n")
    (erase,) = load_requests(path)
    assert erase.is_erase and erase.seed == 1
    path.write_text("source,destination\ntench,goldfish,extra\n")
    with pytest.raises(RequestError, match="r.csv:2: request 1: more cells"):
        load_requests(path)
    path.write_text("source,dest\ntench,goldfish\n")
    with pytest.raises(RequestError, match=r"r.csv:1: the header lacks .*destination"):
        load_requests(path)
    path.write_text("source,destination,seed\ntench,goldfish,1.7\n")
    with pytest.raises(RequestError, match="r.csv:2: request 1: seed must be a whole number"):
        load_requests(path)


def test_json_and_encoding_errors_name_file_and_line(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('[\n {"source": "a", "destination": "b"},\n {"source": "c" "destination": "d"}\n]')
    with pytest.raises(RequestError, match=r"r.json:3: malformed JSON"):
        load_requests(path)
    path.write_text('[{"source": "a", "destination": "b"},\n {"source": "c", "destination": null}]')
    with pytest.raises(RequestError, match=r"r.json:2: request 2: destination is missing"):
        load_requests(path)
    latin = tmp_path / "r.csv"
    latin.write_bytes("source,destination\ntench,goldfish\ncaf\u00e9,tea\n".encode("latin-1"))
    with pytest.raises(RequestError, match=r"r.csv:3: not UTF-8 text \(byte 0xe9\)"):
        load_requests(latin)
    bom = tmp_path / "bom.csv"
    bom.write_bytes("source,destination\ncaf\u00e9,tea\n".encode("utf-8-sig"))
    assert load_requests(bom) == [EditRequest("caf\u00e9", "tea")]


def test_reference_images_may_be_paths(tmp_path):
    request = EditRequest("a", "b", reference_images=[tmp_path / "x.png"])
    assert request.reference_images == (str(tmp_path / "x.png"),)
    with pytest.raises(RequestError, match="a reference image must be text"):
        EditRequest("a", "b", reference_images=[3])


def test_reference_images_relative_to_file(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(png())
    (tmp_path / "r.yaml").write_text("- {source: a, destination: b, reference_images: [img/x.png]}\n")
    (request,) = load_requests(tmp_path / "r.yaml")
    assert request.reference_images == (str(tmp_path / "img/x.png"),)


def _damaged_png() -> bytes:
    data = bytearray(png())
    data[data.index(b"IDAT") + 6] ^= 0xFF  # the chunk's checksum no longer matches
    return bytes(data)


@pytest.mark.parametrize("name, make, message", [
    ("missing.png", None, "does not exist"),
    ("folder.png", "folder", "is a folder, not an image file"),
    ("empty.png", b"", r"is empty \(0 bytes\)"),
    ("notes.png", b"not an image at all\n", r"is not an image \(PIL reads no image format in it\)"),
    ("damaged.png", _damaged_png(), r"is a damaged image: .broken PNG file \(bad header checksum"),
    ("bomb.png", png_bomb(), r"is over PIL's decompression-bomb limit \(Image.MAX_IMAGE_PIXELS = \d+\): "
                             r"Image size \(10000000000 pixels\)"),
])
def test_bad_reference_images_are_refused_at_load(tmp_path, name, make, message):
    image = tmp_path / name
    if make == "folder":
        image.mkdir()
    elif make is not None:
        image.write_bytes(make)
    (tmp_path / "r.yaml").write_text(f"- {{source: a, destination: b}}\n- {{source: owl, destination: "
                                     f"heron, reference_images: [{name}]}}\n")
    with pytest.raises(RequestError, match=f"r.yaml:2: request 2: reference image '.*{name}' of 'owl' "
                                           f"{message}"):
        load_requests(tmp_path / "r.yaml")
    with pytest.raises(RequestError, match=f"request 1: reference image .*{message}"):  # objects too
        parse_requests([EditRequest("owl", "heron", reference_images=[image])])


def test_images_just_over_the_pixel_limit_are_refused(tmp_path, monkeypatch):
    from PIL import Image

    (tmp_path / "x.png").write_bytes(png(10))
    request = EditRequest("owl", "heron", reference_images=[tmp_path / "x.png"])
    assert parse_requests([request]) == [request]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 99)  # PIL only warns below twice the limit
    with pytest.raises(RequestError, match="decompression-bomb limit"):
        parse_requests([request])


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
    long_template = "a " * 1100 + "{}"
    with pytest.raises(RequestError, match="token window") as info:
        subject_positions(sd1.tokenizer, [long_template], "tench")
    message = str(info.value)
    tokens = len(sd1.tokenizer(long_template.format("tench")).input_ids)
    assert f"is {tokens} tokens long" in message
    assert len(message) < 300 and "'a a a" in message



def test_quoted_values_are_cut_short(tmp_path):
    path = tmp_path / "r.yaml"
    for row in ("{source: tench, destination: BOMB}", "BOMB", "{source: BOMB, destination: b}"):
        path.write_text(f"- {row.replace('BOMB', alias_bomb())}\n")
        with pytest.raises(RequestError, match=r"r.yaml:1: request 1: ") as info:
            load_requests(path)
        assert len(str(info.value)) < 200 + len(str(path)), str(info.value)
    essay = "word " * 5000
    with pytest.raises(RequestError, match="edited twice") as info:
        validate_requests([EditRequest(essay, "b"), EditRequest(essay, "c")])
    assert len(str(info.value)) < 400 and "..." in str(info.value)


@pytest.mark.parametrize("name, text, expected", [
    ("r.yaml", "- source: tench\n  destination: goldfish\n  source: zebra\n",
     "r.yaml:3: duplicate key 'source' (first on line 1)"),
    ("r.yaml", "requests: []\nrequests:\n- {source: a, destination: b}\n",
     "r.yaml:2: duplicate key 'requests' (first on line 1)"),
    ("r.json", '[{"source": "a", "destination": "b", "destination": "c"}]', "r.json: duplicate key"),
])
def test_a_request_key_given_twice_is_refused(name, text, expected, tmp_path):
    (tmp_path / name).write_text(text)
    with pytest.raises(RequestError, match=re.escape(expected)):
        load_requests(tmp_path / name)
