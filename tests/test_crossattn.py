"""TIME and UCE baselines: closed forms, each against its paper's equation written out here,
and end to end through the common Editor interface."""

import pytest
import torch

import emcid
from emcid.editors import editor_from_patch, get_editor
from emcid.editors.crossattn import closed_form_update, cross_attention_projections, subject_embeddings


def test_closed_form_equals_least_squares():
    """W' minimises ||W' S^T - V*^T||^2 + lam ||W' - W||^2 + p ||(W' - W) P^T||^2."""
    torch.manual_seed(0)
    out_dim, width, lam, scale = 5, 7, 0.3, 2.0
    weight = torch.randn(out_dim, width, dtype=torch.float64)
    sources, dests, kept = (torch.randn(n, width, dtype=torch.float64) for n in (3, 3, 2))
    targets = dests @ weight.T
    delta = closed_form_update(weight, sources, targets, kept, lam, preserve_scale=scale)
    # rows: edits (S -> V*), the regulariser (sqrt(lam) I -> sqrt(lam) W^T), preserved (P -> P W^T)
    design = torch.cat([sources, lam ** 0.5 * torch.eye(width, dtype=torch.float64), scale ** 0.5 * kept])
    goal = torch.cat([targets, lam ** 0.5 * weight.T, scale ** 0.5 * kept @ weight.T])
    direct = torch.linalg.lstsq(design, goal).solution.T
    assert torch.allclose(weight + delta, direct, atol=1e-9)


@pytest.mark.parametrize("method", ["time", "uce"])
def test_edit_maps_source_to_destination_projection(sd1, method):
    request = emcid.EditRequest("lobster", "crab")
    options = {"lam": 1e-4}
    if method == "uce":
        options["preserve"] = ["dog", "otter"]
    src = subject_embeddings(sd1, request.source_prompts(), [request.source] * 3, list(request.prompts))
    dst = subject_embeddings(sd1, request.destination_prompts(), [request.destination] * 3,
                             list(request.prompts))
    kept = subject_embeddings(sd1, ["dog", "otter"], ["dog", "otter"], ["{}", "{}"])
    projections = cross_attention_projections(sd1, edit_keys=True)
    before = {n: m.weight.detach().double().clone() for n, m in projections.items()}
    patch = emcid.edit(sd1, [request], method=method, progress=False, **options)
    assert set(patch.deltas) == set(projections) and patch.metadata["method"] == method
    patch.apply(sd1)
    for name, module in projections.items():
        new, old = module.weight.detach().double(), before[name]
        mapped_error = (src @ new.T - dst @ old.T).norm() / (dst @ old.T).norm()
        assert mapped_error < 0.05, (name, mapped_error)
        if method == "uce":
            kept_change = (kept @ new.T - kept @ old.T).norm() / (kept @ old.T).norm()
            assert kept_change < 0.05, (name, kept_change)
    patch.revert(sd1)
    assert all(torch.equal(m.weight.double(), before[n]) for n, m in projections.items())


def test_time_has_no_preservation_set(sd1):
    with pytest.raises(emcid.EmcidError, match="no preservation"):
        emcid.edit(sd1, [emcid.EditRequest("lobster", "crab")], method="time", preserve=["dog"])
    with pytest.raises(emcid.EmcidError, match="unknown uce options"):
        emcid.edit(sd1, [emcid.EditRequest("lobster", "crab")], method="uce", steps=3)


def test_sdxl_cross_attention_edit(sdxl):
    """On SDXL (keys: both encoders' states, concatenated) the edited projections map the
    source's conditioning to what the unedited ones made of the destination's."""
    request = emcid.EditRequest("lobster", "crab")
    src = subject_embeddings(sdxl, request.source_prompts(), [request.source] * 3, list(request.prompts))
    dst = subject_embeddings(sdxl, request.destination_prompts(), [request.destination] * 3,
                             list(request.prompts))
    projections = cross_attention_projections(sdxl, edit_keys=True)
    before = {n: m.weight.detach().double().clone() for n, m in projections.items()}
    patch = emcid.edit(sdxl, [request], method="uce", progress=False, lam=1e-4)
    assert set(patch.deltas) == set(projections)
    patch.apply(sdxl)
    for name, module in projections.items():
        old, new = before[name], module.weight.detach().double()
        goal = dst @ old.T
        assert (src @ new.T - goal).norm() < 0.05 * goal.norm(), name
        assert (src @ old.T - goal).norm() > 0.2 * goal.norm(), name  # the edit had work to do


def _token_states(bundle, prompts: list[str]) -> tuple[torch.Tensor, list[int]]:
    """Every token's text-encoder output (SD 1.x: the UNet's conditioning), float64, and each
    prompt's last token before end-of-text, read from the attention mask."""
    tokens = bundle.tokenizer(prompts, padding="max_length", max_length=bundle.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = bundle.text_encoder(tokens.input_ids)[0].double()
    return states, [int(m.sum()) - 2 for m in tokens.attention_mask]


def _closed_form(weight, pairs, lam, scale=1.0, kept=(), keep_scale=1.0) -> torch.Tensor:
    """W' = (lam W + s sum v* c^T + k sum W c c^T)(lam I + s sum c c^T + k sum c c^T)^{-1},
    one outer product per key, the inverse taken as it is written."""
    left, right = lam * weight, lam * torch.eye(weight.shape[1], dtype=torch.float64)
    for c, v_star in pairs:
        left = left + scale * torch.outer(v_star, c)
        right = right + scale * torch.outer(c, c)
    for c in kept:
        left = left + keep_scale * torch.outer(weight @ c, c)
        right = right + keep_scale * torch.outer(c, c)
    return left @ torch.linalg.inv(right)


def _assert_deltas(deltas: dict, expected: dict) -> None:
    assert set(deltas) == set(expected)
    for name, want in expected.items():
        got = deltas[name].double()
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), name


def test_time_matches_its_paper(sd1):
    """TIME (Orgad et al., 2023): W' = (sum v* c^T + lam W)(sum c c^T + lam I)^{-1} at its
    paper's lam = 0.1, with c the source's subject-token embedding, v* = W c_dst."""
    templates = ("a photo of {}", "{}")
    requests = [emcid.EditRequest("lobster", "crab", templates),
                emcid.EditRequest("otter", "killer whale", templates)]
    editor = get_editor("time")
    assert editor.config.lam == 0.1
    src, src_last = _token_states(sd1, [r.source_prompts()[i] for r in requests for i in range(2)])
    dst, dst_last = _token_states(sd1, [r.destination_prompts()[i] for r in requests for i in range(2)])
    keys = [(src[n, src_last[n]], dst[n, dst_last[n]]) for n in range(len(src))]
    expected = {}
    for name, module in cross_attention_projections(sd1, edit_keys=True).items():
        w = module.weight.detach().double()
        expected[name] = _closed_form(w, [(c, w @ c_dst) for c, c_dst in keys], lam=0.1) - w
    _assert_deltas(editor.compute(sd1, requests, progress=False), expected)


@pytest.mark.parametrize("preserve", [[], ["dog", "goldfish"]])
def test_uce_paper_variant_matches_the_2023_equations(sd1, preserve):
    """UCE's closed form (Gandikota et al., 2024, with the lambda term of its 2023 code) on
    the keys and "tensor" targets the EMCID release's copy uses: the bare source name's tokens
    from its last subject token to the end (end-of-text, padding) against the destination's
    from its last token, cut to one count; v* = W c_dst less its component along the edit's
    W c_src (all its tokens as one vector); lam = erase scale = preserve scale = 0.1; the
    preserved prompts (every token), or "" when none are given."""
    requests = [emcid.EditRequest("quokka", "crab"),  # a source of several tokens
                emcid.EditRequest("lobster", "killer whale"),  # a longer destination
                emcid.EditRequest("tench", "")]  # an erase: the destination is the empty prompt
    editor = get_editor("uce", variant="paper", preserve=preserve)
    src, src_last = _token_states(sd1, [r.source for r in requests])
    dst, dst_last = _token_states(sd1, [r.destination for r in requests])
    kept, _ = _token_states(sd1, preserve or [""])
    kept = kept.reshape(-1, kept.shape[-1])
    assert src_last[0] > 1 and dst_last[1] > src_last[1] and dst_last[2] == 0
    expected = {}
    for name, module in cross_attention_projections(sd1, edit_keys=True).items():
        w = module.weight.detach().double()
        pairs = []
        for n, (s, d) in enumerate(zip(src_last, dst_last)):
            far = max(s, d)
            c_src, c_dst = src[n, s:77 - (far - s)], dst[n, d:77 - (far - d)]
            u = c_src @ w.T / (c_src @ w.T).norm()
            v_star = c_dst @ w.T - (u * (c_dst @ w.T)).sum() * u
            pairs += list(zip(c_src, v_star))
        expected[name] = _closed_form(w, pairs, 0.1, 0.1, kept, 0.1) - w
    _assert_deltas(editor.compute(sd1, requests, progress=False), expected)


def test_uce_variant_recorded_and_checked(sd1):
    request = emcid.EditRequest("lobster", "crab")
    patch = emcid.edit(sd1, [request], method="uce", variant="paper", progress=False)
    hparams = patch.metadata["hparams"]
    assert (hparams["variant"], hparams["lam"], hparams["erase_scale"], hparams["preserve_scale"]) == (
        "paper", 0.1, 0.1, 0.1)
    assert editor_from_patch(patch).config == get_editor("uce", variant="paper").config
    default = get_editor("uce").hparams()
    assert (default["variant"], default["erase_scale"], default["preserve_scale"]) == ("v2025", 1.0, 1.0)
    # a patch written before the variant existed rebuilds the 2025 editor it was made with
    old = {"method": "uce", "hparams": {"lam": 0.1, "preserve": [], "preserve_scale": 1.0, "edit_keys": True}}
    assert editor_from_patch(old).hparams() == default
    assert get_editor("uce", variant="paper", erase_scale=0.5).config.erase_scale == 0.5
    for bad in ("2023", 2025, "Paper"):
        with pytest.raises(emcid.EmcidError, match=r"variant=.*choose from v2025, paper"):
            get_editor("uce", variant=bad)
    with pytest.raises(emcid.EmcidError, match="unknown time options"):
        get_editor("time", variant="paper")
