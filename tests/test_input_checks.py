"""Bad inputs refused when they load, by the command line: exit status 2, one error line naming
the file, the line and the request, the input files unchanged, the model never loaded."""

import pytest
from input_helpers import png_bomb, refused

BAD_REQUEST_FILES = {
    "a key twice": ("r.yaml", "- source: tench\n  destination: goldfish\n  destination: carp\n",
                    "r.yaml:3: duplicate key 'destination' (first on line 2)"),
    "a zero-width source": ("r.yaml", '- {source: tench, destination: goldfish}\n- {source: "\\u200b", '
                            "destination: carp}\n", r"r.yaml:2: request 2: source '\u200b' is only "
                            "invisible or control characters (U+200B)"),
    "a NUL source": ("r.json", '[{"source": "\\u0000", "destination": "b"}]',
                     r"r.json:1: request 1: source '\x00' is only invisible"),
    "a spaces destination": ("r.csv", "source,destination\ntench,goldfish\nzebra,   \n",
                             "r.csv:3: request 2: the destination of 'zebra' is only white space (3 "
                             'characters: U+0020): an erase is written as an empty destination, ""'),
    "an invisible debias value": ("r.yaml", '- {source: doctor, debias: [male, "\\u2060"]}\n',
                                  r"r.yaml:1: request 1: a debias value '\u2060' is only invisible"),
    "a swap": ("r.csv", "source,destination\ntench,goldfish\ngoldfish,tench\n",
               "cycle 'tench' -> 'goldfish' -> 'tench' ({path}:2: request 1; {path}:3: request 2)"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUEST_FILES))
def test_bad_request_file_is_refused_before_the_model_loads(case, tmp_path, capsys, monkeypatch):
    import emcid.cli_commands

    monkeypatch.setattr(emcid.cli_commands, "_load", lambda args: pytest.fail("the model was loaded"))
    name, text, expected = BAD_REQUEST_FILES[case]
    path = tmp_path / name
    path.write_bytes(text.encode())
    out = tmp_path / "p.safetensors"
    refused(capsys, ["edit", "--requests", str(path), "--out", str(out)], [path],
            expected.format(path=path))
    assert not out.exists()


@pytest.mark.parametrize("content, expected", [
    (None, "does not exist"), (b"", "is empty (0 bytes)"), (b"GIF89a, not really", "is not an image"),
    (png_bomb(), "is over PIL's decompression-bomb limit"),
])
def test_bad_reference_image_is_refused_before_the_model_loads(content, expected, tmp_path, capsys,
                                                                monkeypatch):
    import emcid.cli_commands

    monkeypatch.setattr(emcid.cli_commands, "_load", lambda args: pytest.fail("the model was loaded"))
    image = tmp_path / "ref.png"
    if content is not None:
        image.write_bytes(content)
    path = tmp_path / "r.yaml"
    path.write_text("- {source: tench, destination: goldfish}\n"
                    "- {source: owl, destination: heron, reference_images: [ref.png]}\n")
    refused(capsys, ["edit", "--requests", str(path), "--out", str(tmp_path / "p.safetensors")],
            [path, *([image] if content is not None else [])],
            f"r.yaml:2: request 2: reference image '{image}' of 'owl' {expected}")


@pytest.mark.parametrize("content, expected", [
    (None, "is not a file"), (b"", "captions.txt is empty"), (b"  \n\t\n\n", "captions.txt is blank"),
    (b"a photo of a cat\ncaf\xe9 au lait\n", "captions.txt:2: not UTF-8 text (byte 0xe9)"),
    (b"a cat\n\x00\x00\x00\n", "captions.txt:2: a NUL character"),
])
def test_bad_corpus_is_refused_before_the_model_loads(content, expected, tmp_path, capsys, monkeypatch):
    import emcid.cli_commands

    monkeypatch.setattr(emcid.cli_commands, "_load", lambda args: pytest.fail("the model was loaded"))
    corpus = tmp_path / "captions.txt"
    if content is not None:
        corpus.write_bytes(content)
    path = tmp_path / "r.yaml"
    path.write_text("- {source: tench, destination: goldfish}\n")
    refused(capsys, ["edit", "--requests", str(path), "--out", str(tmp_path / "p.safetensors"),
                     "--corpus", str(corpus)], [path, *([corpus] if content is not None else [])],
            "emcid: error: corpus ", expected)


def test_a_corpus_gives_its_non_blank_lines(tmp_path):
    from emcid.core.config import read_corpus

    (tmp_path / "c.txt").write_bytes("\ufeffa cat\n\n  caf\u00e9 au lait \n".encode("utf-8"))
    assert read_corpus(tmp_path / "c.txt") == ["a cat", "caf\u00e9 au lait"]


LONG = " ".join(["very"] * 90)


@pytest.mark.parametrize("row, expected", [
    (f"{{source: tench, destination: '{LONG} goldfish'}}",
     ("the request 'tench' -> 'very very", "(text_encoder), destination: prompt 'An image of very")),
    (f"{{source: tench, destination: goldfish, prompts: ['{{}} {LONG}']}}",
     ("the request 'tench' -> 'goldfish' (text_encoder), source: prompt 'tench very very",)),
])
def test_a_prompt_over_the_token_window_is_refused_before_stage1(row, expected, tmp_path, sd1_dir, capsys,
                                                                 monkeypatch):
    from emcid.editors import emcid as emcid_editor

    monkeypatch.setattr(emcid_editor, "compute_targets", lambda *a, **k: pytest.fail("Stage I ran"))
    path = tmp_path / "r.yaml"
    path.write_text(f"- {{source: zebra, destination: horse}}\n- {row}\n")
    line = refused(capsys, ["edit", "--model", str(sd1_dir), "--requests", str(path), "--out",
                            str(tmp_path / "p.safetensors")], [path], *expected, "tokens long",
                   "over the 77-token window")
    assert len(line) < 400, line


def test_a_debias_prompt_over_the_token_window_is_refused_before_any_work(sd1, monkeypatch):
    import emcid
    from emcid.tasks import debias

    monkeypatch.setattr(debias, "ClipZeroShot", lambda *a, **k: pytest.fail("the classifier loaded"))
    with pytest.raises(emcid.EmcidError, match="the request 'a doctor' -> 'a male doctor' .*tokens long"):
        emcid.edit(sd1, [{"source": "doctor", "debias": ["male", "female"], "prompts": [f"{{}} {LONG}"]}],
                   progress=False)
