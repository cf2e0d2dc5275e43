"""Caption files in the layouts users have: COCO captions JSON, JSON lists, JSON lines, CSV/TSV
columns, plain lines; an unknown layout is refused naming what was looked for."""

import json

import pytest

from emcid.core.corpus import read_corpus
from emcid.errors import OptionError


@pytest.mark.parametrize("name, content", [
    ("captions_val2017.json", json.dumps({"info": {}, "images": [{"id": 1}], "annotations": [
        {"image_id": 1, "id": 5, "caption": " A cat on a mat. "},
        {"image_id": 1, "id": 6, "caption": "A dog"}]})),
    ("list.json", json.dumps(["A cat on a mat.", "", "A dog"])),
    ("objects.json", json.dumps([{"text": "A cat on a mat."}, {"caption": "A dog"}])),
    ("lines.jsonl", '{"caption": "A cat on a mat."}\n\n"A dog"\n'),
    ("table.csv", 'url,Caption,score\nhttp://x,"A cat on a mat.",0.3\nhttp://y,A dog,0.1\n'),
    ("table.tsv", "TEXT\tid\nA cat on a mat.\t1\nA dog\t2\n"),
    ("plain.txt", "A cat on a mat.\n\n  A dog\n"),
])
def test_every_layout_gives_its_captions(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert read_corpus(path) == ["A cat on a mat.", "A dog"]


@pytest.mark.parametrize("name, content, match", [
    ("t.csv", "url,score\nhttp://x,1\n", r"no caption column; looked for caption, captions, text, "
                                         r"prompt, sentence, found \['url', 'score'\]"),
    ("c.json", json.dumps({"images": []}), "needs an 'annotations' list"),
    ("c.json", json.dumps([{"url": "x"}]), "item 0: expected a caption string"),
    ("c.json", '{"annotations": [', r"c.json:1: not valid JSON"),
    ("c.jsonl", '"a"\n{oops\n', r"c.jsonl:2: not valid JSON"),
    ("e.json", "[]", "holds no captions"),
])
def test_an_unknown_layout_is_refused_naming_the_file(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(OptionError, match=match):
        read_corpus(path)
