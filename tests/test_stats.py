import copy
import shutil

import pytest
import torch

from emcid.cache import TensorCache
from emcid.errors import StatsMismatchError
from emcid.stats import second_moments

CAPTIONS = ["a photo of a tench", "goldfish in a bowl", "a zebra", "the castle at night"] * 3


def test_second_moment_matches_direct_computation(sd1):
    name = sd1.slot("text_encoder").fc2_name(1)
    (moment,) = second_moments(sd1, [name], CAPTIONS, progress=False).values()
    keys = []
    handle = sd1.module(name).register_forward_hook(lambda m, i, o: keys.append(i[0]))
    for caption in CAPTIONS:  # one at a time: no padding at all
        with torch.no_grad():
            sd1.text_encoder(sd1.tokenizer([caption], return_tensors="pt").input_ids)
    handle.remove()
    stacked = torch.cat([k[0] for k in keys]).double()
    assert torch.allclose(moment.double(), stacked.T @ stacked / len(stacked), rtol=1e-4, atol=1e-6)


def test_statistics_are_cached(sd1, monkeypatch):
    from emcid.core import stats

    name = sd1.slot("text_encoder").fc2_name(0)
    first = second_moments(sd1, [name], CAPTIONS[:5], progress=False)
    monkeypatch.setattr(stats, "_accumulate", lambda *a, **k: pytest.fail("recomputed"))
    again = second_moments(sd1, [name], CAPTIONS[:5], progress=False)
    assert torch.equal(first[name], again[name])


def test_statistics_of_another_model_refused(sd1, sdxl):
    cache = TensorCache("stats-mismatch")
    name = sd1.slot("text_encoder").fc2_name(0)
    second_moments(sd1, [name], CAPTIONS, cache=cache, progress=False)
    (entry,) = list(cache.folder.glob("*.safetensors"))
    # plant the SD-1.x file where the SDXL model's entry for the same module would be
    from emcid.cache import content_key
    from emcid.stats import corpus_hash, encoder_fingerprint

    key = content_key(model=encoder_fingerprint(sdxl, name), module=name, corpus=corpus_hash(CAPTIONS),
                      samples=len(CAPTIONS))
    shutil.copy(entry, cache.path(key))
    with pytest.raises(StatsMismatchError, match="computed for model"):
        second_moments(sdxl, [name], CAPTIONS, cache=cache, progress=False)


def test_corrupted_statistics_recomputed(sd1):
    cache = TensorCache("stats-corrupt")
    name = sd1.slot("text_encoder").fc2_name(0)
    first = second_moments(sd1, [name], CAPTIONS, cache=cache, progress=False)
    (entry,) = list(cache.folder.glob("*.safetensors"))
    data = bytearray(entry.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the tensor data: the checksum catches it
    entry.write_bytes(bytes(data))
    again = second_moments(sd1, [name], CAPTIONS, cache=cache, progress=False)
    assert torch.equal(first[name], again[name])


def test_statistics_survive_a_new_unet(sd1, monkeypatch):
    """They depend on the text encoder only: retraining the UNet must not recompute them."""
    from emcid.core import stats

    name = sd1.slot("text_encoder").fc2_name(2)
    second_moments(sd1, [name], CAPTIONS[:7], progress=False)
    with torch.no_grad():
        next(sd1.unet.parameters()).add_(1.0)
    monkeypatch.setattr(stats, "_accumulate", lambda *a, **k: pytest.fail("recomputed"))
    second_moments(sd1, [name], CAPTIONS[:7], progress=False)


def _direct_moment(bundle, name: str, captions) -> torch.Tensor:
    """E[k k^T] over every caption's own tokens, one caption at a time (no padding at all)."""
    slot = bundle.slot(name.split(".")[0])
    keys = []
    handle = bundle.module(name).register_forward_hook(lambda m, i, o: keys.append(i[0][0]))
    for caption in captions:
        ids = slot.tokenizer([caption], truncation=True, max_length=slot.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            slot.encoder(ids)
    handle.remove()
    stacked = torch.cat(keys).double()
    return stacked.T @ stacked / len(stacked)


def test_sdxl_statistics_divide_each_encoder_by_its_own_token_count(sdxl):
    """The second tokenizer truncates long captions harder, so the two encoders see different
    token counts; each module must be divided by its own encoder's count."""
    sdxl.pipeline.tokenizer_2 = copy.deepcopy(sdxl.tokenizer)
    sdxl.pipeline.tokenizer_2.model_max_length = 4
    names = [sdxl.slot("text_encoder").fc2_name(1), sdxl.slot("text_encoder_2").fc2_name(2)]
    moments = second_moments(sdxl, names, CAPTIONS, cache=TensorCache("stats-sdxl"), progress=False)
    for name in names:
        expected = _direct_moment(sdxl, name, CAPTIONS)
        assert torch.allclose(moments[name].double(), expected, rtol=1e-4, atol=1e-6), name


def test_captions_without_drop_whole_word_mentions_in_any_case():
    from emcid.core.stats import captions_without

    captions = ["a photo of tench", "A TENCH, centered", "tenches in a pond", "a volcano at night",
                "a sea lion and a lion", "goldfish"]
    assert captions_without(captions, ["tench", "lion"]) == ["tenches in a pond", "a volcano at night",
                                                            "goldfish"]
    assert captions_without(captions, []) == captions


@pytest.mark.parametrize("names", [["tench"], ["tench", "car", "dog"]],
                         ids=["fewer-left-out", "more-left-out"])
def test_statistics_without_names_match_the_kept_captions_alone(sd1, names):
    """Both ways (cached totals less the named captions' sums, or the kept captions summed when
    fewer stay) give C of the kept captions."""
    from emcid.core.stats import captions_without

    captions = ["a photo of a tench", "a red car on a road", "tench in a net", "a dog on grass",
                "a castle at night", "a volcano", "goldfish in a bowl"]
    name = sd1.slot("text_encoder").fc2_name(1)
    cache = TensorCache("stats-without")
    without = second_moments(sd1, [name], captions, cache=cache, progress=False, without=names)
    kept = captions_without(captions, names)
    assert torch.allclose(without[name].double(), _direct_moment(sd1, name, kept), rtol=1e-4, atol=1e-6)


def test_statistics_without_names_encode_only_the_captions_left_out(sd1, monkeypatch):
    from emcid.core import stats

    captions = ["a photo of a tench", "a red car on a road", "a dog on grass", "a castle at night"]
    name = sd1.slot("text_encoder").fc2_name(0)
    cache = TensorCache("stats-without-cost")
    second_moments(sd1, [name], captions, cache=cache, progress=False)  # the cached totals
    encoded = []

    def recording(bundle, slot_name, names, texts, *args, **kwargs):
        encoded.extend(texts)
        return running_sums(bundle, slot_name, names, texts, *args, **kwargs)

    running_sums = stats.running_sums
    monkeypatch.setattr(stats, "running_sums", recording)
    second_moments(sd1, [name], captions, cache=cache, progress=False, without=["tench"])
    assert encoded == ["a photo of a tench"]


def test_statistics_without_sources_leave_out_the_captions_that_name_them(sd1, tmp_path, monkeypatch):
    import emcid
    from emcid.editors import emcid as emcid_editor
    from emcid.errors import OptionError

    seen = {}

    def recording(bundle, names, captions, *args, **kwargs):
        seen["without"] = kwargs["without"]
        return second_moments(bundle, names, captions, *args, **kwargs)

    monkeypatch.setattr(emcid_editor, "second_moments", recording)
    corpus = tmp_path / "captions.txt"
    corpus.write_text("a photo of a tench\na red car on a road\ntench in a net\na dog on grass\n")
    options = {"steps": 1, "layers": {"text_encoder": [1]}, "corpus": str(corpus), "lam": 1.0}
    emcid.edit(sd1, [emcid.EditRequest("tench", "goldfish")], progress=False, **options)  # the default
    assert seen["without"] == ["tench"]
    emcid.edit(sd1, [emcid.EditRequest("tench", "goldfish")], progress=False,
               stats_without_sources=False, **options)
    assert seen["without"] == []
    corpus.write_text("a photo of a tench\ntench in a net\n")
    with pytest.raises(OptionError, match="every statistics caption names an edited source"):
        emcid.edit(sd1, [emcid.EditRequest("tench", "goldfish")], progress=False,
                   stats_without_sources=True, **options)
    with pytest.raises(OptionError, match="stats_without_sources"):
        emcid.edit(sd1, [emcid.EditRequest("tench", "goldfish")], progress=False,
                   stats_without_sources="yes", **options)


def test_token_neighbours_of_the_sources_count_as_often_as_asked(sd1):
    """With neighbour_weight 3, C is the kept captions' plus twice the sums of those that share
    a word piece with a source (but name none) over the kept tokens; common word pieces ("a")
    do not count."""
    from emcid.core.stats import captions_without, neighbour_captions

    captions = ["a photo of a goldfish", "a red car on a road", "goldfish in a bowl", "a dog on grass",
                "a castle at night", "a goldfinch on a branch", "a car park", "a fish market", "a cat"]
    sources = ["goldfish", "fish"]
    kept = captions_without(captions, sources)
    near = neighbour_captions(sd1, kept, sources)
    assert "a dog on grass" not in near and "a cat" not in near  # "a" is in most captions
    assert near, "the tiny tokenizer splits no caption's words into the sources' pieces"
    name = sd1.slot("text_encoder").fc2_name(1)
    weighed = second_moments(sd1, [name], captions, cache=TensorCache("stats-neighbours"), progress=False,
                             without=sources, neighbours=sources, neighbour_weight=3.0)
    tokens = {c: sd1.tokenizer([c], return_tensors="pt").input_ids.shape[1] for c in kept}
    kept_tokens, near_tokens = sum(tokens.values()), sum(tokens[c] for c in near)
    added = 2 * _direct_moment(sd1, name, near) * near_tokens / kept_tokens
    expected = _direct_moment(sd1, name, kept) + added
    assert torch.allclose(weighed[name].double(), expected, rtol=1e-4, atol=1e-6)
    plain = second_moments(sd1, [name], captions, cache=TensorCache("stats-neighbours"), progress=False,
                           without=sources)
    assert not torch.allclose(weighed[name], plain[name], rtol=1e-3)
