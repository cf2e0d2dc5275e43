"""LoRA export: stock diffusers loads it and reproduces the patched text encoders; A1111's and
kohya sd-scripts' key matching (replayed here from their naming rules) finds every edited module."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from emcid import EditPatch, EmcidError, load_model
from emcid.cli import main
from emcid.core.bundle import get_submodule
from emcid.lora import export_lora, lora_from_patch
from emcid.models import ModelBundle

PROMPTS = ["a photo of a tench", "goldfish", "An image of a zebra in a field"]


def low_rank_patch(bundle, rank: int = 3, layers=(0, 1, 2), seed: int = 0) -> EditPatch:
    """A patch of random rank-``rank`` deltas on every text encoder's fc2 at ``layers``."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for slot in bundle.slots():
        for layer in layers:
            out_dim, in_dim = slot.fc2(layer).weight.shape
            deltas[slot.fc2_name(layer)] = 0.1 * (torch.randn(out_dim, rank, generator=generator)
                                                  @ torch.randn(rank, in_dim, generator=generator))
    requests = [{"source": "tench", "destination": "goldfish"}, {"source": "zebra", "destination": "horse"}]
    return EditPatch.from_dense(deltas, {"family": bundle.family, "base_fingerprint": bundle.fingerprint(),
                                         "requests": requests})


def stock_pipeline(folder, family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    return cls.from_pretrained(str(folder))


@torch.no_grad()
def encodings(pipeline, family: str) -> list[torch.Tensor]:
    """What the UNet is conditioned on, encoded by emcid's reader around any pipeline."""
    encoding = ModelBundle(pipeline, family, "", {}).encode(PROMPTS)
    return [encoding.embeds, *encoding.pooled]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_stock_diffusers_loads_fuses_and_unfuses(family, format, tmp_path, request):
    folder = request.getfixturevalue(f"{family}_dir")
    bundle = load_model(folder)
    base = encodings(bundle.pipeline, family)
    patch = low_rank_patch(bundle)
    patch.apply(bundle)
    patched = encodings(bundle.pipeline, family)
    assert (patched[0] - base[0]).abs().max() > 1e-2  # the edit is visible

    export = export_lora(patch, tmp_path / "edit.safetensors", format=format)
    assert export.exact and export.rank == 3 and export.format == format
    assert sorted(load_file(tmp_path / "edit.safetensors")) == sorted(export.tensors)
    pipe = stock_pipeline(folder, family)
    pipe.load_lora_weights(str(tmp_path / "edit.safetensors"))
    assert_close(encodings(pipe, family), patched)
    pipe.fuse_lora()
    assert_close(encodings(pipe, family), patched)
    pipe.unfuse_lora()
    assert_close(encodings(pipe, family), patched)  # unfused, the adapter still runs
    pipe.unload_lora_weights()
    assert_close(encodings(pipe, family), base)

    baked = stock_pipeline(folder, family)  # fuse then unload: the edit stays in the weights
    baked.load_lora_weights(str(tmp_path), weight_name="edit.safetensors")
    baked.fuse_lora()
    baked.unload_lora_weights()
    assert_close(encodings(baked, family), patched)


def test_lower_rank_keeps_the_top_directions(sd1_dir, tmp_path):
    bundle = load_model(sd1_dir)
    patch = low_rank_patch(bundle, rank=3)
    export = export_lora(patch, tmp_path / "lora", rank=1)  # a folder: diffusers' file name
    assert not export.exact and export.rank == 1 and export.patch_rank == 3
    pipe = stock_pipeline(sd1_dir, "sd1")
    pipe.load_lora_weights(str(tmp_path / "lora"))
    pipe.fuse_lora()
    for name, delta in patch.deltas.items():
        u, s, vh = torch.linalg.svd(delta.dense().double())
        assert export.kept_energy[name] == pytest.approx(float(s[0] ** 2 / (s ** 2).sum()))
        assert export.kept_energy[name] < 1
        module = name.partition(".")[2].removeprefix("text_model.")
        fused = pipe.text_encoder.get_submodule(module).weight - bundle.module(name).weight
        assert torch.allclose(fused.double(), s[0] * torch.outer(u[:, 0], vh[0]), atol=1e-5)


def test_cli_exports_an_edit(sd1_dir, tmp_path, capsys):
    import emcid

    bundle = load_model(sd1_dir)
    requests = [emcid.EditRequest("tench", "goldfish"), emcid.EditRequest("zebra", "horse")]
    patch = emcid.edit(bundle, requests, progress=False,
                       steps=3, stats_samples=50, lam=1.0, layers={"text_encoder": [1, 2]})
    patch.save(tmp_path / "edit.safetensors")
    out = tmp_path / "lora.safetensors"
    assert main(["export-lora", "--patch", str(tmp_path / "edit.safetensors"), "--out", str(out)]) == 0
    assert "(exact" in capsys.readouterr().out
    assert lora_from_patch(patch).patch_rank > 1
    patch.apply(bundle)
    pipe = stock_pipeline(sd1_dir, "sd1")
    pipe.load_lora_weights(str(out))
    assert_close(encodings(pipe, "sd1"), encodings(bundle.pipeline, "sd1"))

    assert main(["export-lora", "--patch", str(tmp_path / "edit.safetensors"), "--out",
                 str(tmp_path / "low.safetensors"), "--rank", "1"]) == 0
    report = capsys.readouterr().out
    assert "energy" in report and "layers.1.mlp.fc2" in report

    diff = tmp_path / "full.safetensors"
    assert main(["export-lora", "--patch", str(tmp_path / "edit.safetensors"), "--out", str(diff),
                 "--format", "diff"]) == 0
    assert "(exact)" in capsys.readouterr().out
    assert all(key.endswith(".diff") for key in load_file(diff))


def test_bad_input_is_refused_and_nothing_written(sd1_dir, tmp_path, capsys):
    bundle = load_model(sd1_dir)
    patch = low_rank_patch(bundle)
    width = bundle.text_encoder.config.hidden_size
    out = tmp_path / "lora.safetensors"
    for rank in (0, width + 1):
        with pytest.raises(EmcidError, match="--rank"):
            export_lora(patch, out, rank=rank)
    unet_only = EditPatch.from_dense({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v":
                                      torch.ones(16, 32)}, {"family": "sd1"})
    with pytest.raises(EmcidError, match="--patch edits no text-encoder module"):
        lora_from_patch(unet_only)
    second = {"text_encoder_2.text_model.encoder.layers.0.mlp.fc2": torch.ones(32, 128)}
    wrong_family = EditPatch.from_dense({**{n: d.dense() for n, d in patch.deltas.items()}, **second},
                                        {"family": "sd1"})
    with pytest.raises(EmcidError, match="text_encoder_2"):
        lora_from_patch(wrong_family)
    with pytest.raises(EmcidError, match="--format 'peft': choose one of kohya, diffusers, diff"):
        export_lora(patch, out, format="peft")
    with pytest.raises(EmcidError, match="--rank 2: --format diff writes each delta in full"):
        export_lora(patch, out, rank=2, format="diff")
    patch.save(tmp_path / "edit.safetensors")
    for option in (["--rank", "0"], ["--format", "a1111"]):
        assert main(["export-lora", "--patch", str(tmp_path / "edit.safetensors"), "--out", str(out),
                     *option]) == 2
        assert " ".join(option) in capsys.readouterr().err.replace("'", "")
    assert not out.exists()


def transformers4_modules(encoder: torch.nn.Module):
    """(path, module) as transformers 4, which A1111 and sd-scripts run, names them: transformers 5
    dropped CLIPTextModel's ``text_model`` level (emcid's names keep it, as checkpoints do)."""
    for path, module in getattr(encoder, "text_model", encoder).named_modules():
        yield f"text_model.{path}", module


def kohya_names(bundle) -> dict[str, str]:
    """The modules sd-scripts' LoRANetwork creates for the text encoders -> emcid's module names.

    It wraps each Linear child of a CLIPAttention/CLIPMLP module, named prefix + '.' + its path
    with '.' replaced by '_'; the prefix is lora_te for one encoder, lora_te1/lora_te2 for two.
    """
    slots = bundle.slots()
    names = {}
    for index, slot in enumerate(slots, start=1):
        prefix = "lora_te" if len(slots) == 1 else f"lora_te{index}"
        for path, module in transformers4_modules(slot.encoder):
            if type(module).__name__ not in ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"):
                continue
            for child, linear in module.named_children():
                if isinstance(linear, torch.nn.Linear):
                    names[f"{prefix}.{path}.{child}".replace(".", "_")] = f"{slot.name}.{path}.{child}"
    return names


def openclip_path(path: str) -> str | None:
    """An HF CLIP text-encoder Linear's name in OpenCLIP (SD 2.x, SDXL's second encoder), where
    A1111 finds it; q/k/v are one fused in_proj there, not Linear modules."""
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(mlp\.fc1|mlp\.fc2|self_attn\.out_proj)", path)
    if m is None:
        return None
    part = {"mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}[m[2]]
    return f"model.transformer.resblocks.{m[1]}.{part}"


def a1111_layers(bundle) -> dict[str, str]:
    """A1111's network_layer_mapping for the text encoders (module path, '.' -> '_'; SDXL's
    embedders numbered 0_ and 1_) -> emcid's module names. CLIP-L sits under `transformer.`."""
    layers = {}
    for index, slot in enumerate(bundle.slots()):
        openclip = bundle.family == "sd2" or index == 1
        for path, module in transformers4_modules(slot.encoder):
            name = openclip_path(path) if openclip else f"transformer.{path}"
            if isinstance(module, torch.nn.Linear) and name is not None:
                number = f"{index}_" if bundle.family == "sdxl" else ""
                layers[number + name.replace(".", "_")] = f"{slot.name}.{path}"
    return layers


def _openclip_part(rest: str) -> str:
    if "mlp_fc1" in rest:
        return rest.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in rest:
        return rest.replace("mlp_fc2", "mlp_c_proj")
    return rest.replace("self_attn", "attn")


def a1111_match(key: str, layers: dict[str, str], sd2: bool) -> str | None:
    """A1111's Lora extension: convert_diffusers_name_to_compvis, then its lora_te1 fallbacks."""
    m = re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        key = (f"model_transformer_resblocks_{m[1]}_{_openclip_part(m[2])}" if sd2
               else f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}")
    m = re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        key = f"1_model_transformer_resblocks_{m[1]}_{_openclip_part(m[2])}"
    if key not in layers and "lora_te1_text_model" in key:
        for replacement in ("0_transformer_text_model", "transformer_text_model"):
            if key.replace("lora_te1_text_model", replacement) in layers:
                return layers[key.replace("lora_te1_text_model", replacement)]
    return layers.get(key)


def tiny_bundle(family: str, request) -> ModelBundle:
    if family == "sd2":  # built in memory: only its text encoder's modules are needed
        from emcid.tiny import build_tiny_pipeline

        return ModelBundle(build_tiny_pipeline("sd2"), "sd2", "", {})
    return load_model(request.getfixturevalue(f"{family}_dir"))


@pytest.mark.parametrize("format", ["kohya", "diff"])
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_a1111_and_kohya_match_every_edited_module(family, format, request):
    bundle = tiny_bundle(family, request)
    patch = low_rank_patch(bundle)
    export = lora_from_patch(patch, format=format)
    parts = {}
    for key in export.tensors:
        module, _, part = key.partition(".")
        parts.setdefault(module, set()).add(part)
    wanted = {"diff"} if format == "diff" else {"lora_up.weight", "lora_down.weight", "alpha"}
    assert all(p == wanted for p in parts.values()), parts  # A1111's lora / full module types
    layers = a1111_layers(bundle)
    matched = {module: a1111_match(module, layers, family == "sd2") for module in parts}
    assert None not in matched.values(), [k for k, v in matched.items() if v is None]
    assert sorted(matched.values()) == sorted(patch.deltas)
    if format == "kohya":  # sd-scripts loads lora_up/lora_down only (no .diff)
        kohya = kohya_names(bundle)
        assert set(parts) <= set(kohya), sorted(set(parts) - set(kohya))
        assert sorted(kohya[m] for m in parts) == sorted(patch.deltas)


def test_sdxl_names_its_encoders_te1_and_te2_as_diffusers_converter_does(sdxl):
    from diffusers.utils import convert_state_dict_to_kohya

    patch = low_rank_patch(sdxl)
    export = lora_from_patch(patch)
    prefixes = {key.split("_text_model_")[0] for key in export.tensors}
    assert prefixes == {"lora_te1", "lora_te2"}
    peft = {}  # the same factors under PEFT's names, which diffusers' converter takes
    for key, tensor in lora_from_patch(patch, format="diffusers").tensors.items():
        key = key.replace("lora_linear_layer.up", "lora_B").replace("lora_linear_layer.down", "lora_A")
        peft[key] = tensor
    converted = convert_state_dict_to_kohya(peft)
    assert sorted(converted) == sorted(export.tensors)
    assert all(torch.equal(converted[k].float(), export.tensors[k]) for k in converted)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_metadata_names_the_base_model_network_and_edit(family, tmp_path, request):
    bundle = tiny_bundle(family, request)
    patch = low_rank_patch(bundle, rank=3)
    export = export_lora(patch, tmp_path / "edit.safetensors", rank=2)
    with safe_open(str(tmp_path / "edit.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata == export.metadata
    raw = (tmp_path / "edit.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])  # keeps the file's order
    assert list(header["__metadata__"]) == sorted(metadata) and list(header) == sorted(header)
    version = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]
    assert metadata["ss_base_model_version"] == version
    assert metadata["ss_v2"] == str(family == "sd2")
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == metadata["emcid_rank"] == "2"
    assert metadata["ss_network_module"] == "networks.lora" and metadata["format"] == "pt"
    assert metadata["emcid_base_fingerprint"] == bundle.fingerprint()
    assert metadata["emcid_family"] == family
    assert json.loads(metadata["emcid_kept_energy"]) == pytest.approx(export.kept_energy)
    assert set(export.kept_energy) == set(patch.deltas) and max(export.kept_energy.values()) < 1
    assert json.loads(metadata["emcid_sources"]) == ["tench", "zebra"]
    alphas = [t for k, t in load_file(tmp_path / "edit.safetensors").items() if k.endswith(".alpha")]
    assert len(alphas) == len(patch.deltas) and all(a.ndim == 0 and float(a) == 2 for a in alphas)


def test_diff_holds_each_delta_exactly(sd1_dir, tmp_path):
    bundle = load_model(sd1_dir)
    patch = low_rank_patch(bundle)
    export = export_lora(patch, tmp_path / "edit.safetensors", format="diff")
    assert export.exact and export.rank == export.patch_rank == 3
    stored = load_file(tmp_path / "edit.safetensors")
    layers = a1111_layers(bundle)
    pipe = stock_pipeline(sd1_dir, "sd1")
    with torch.no_grad():
        for key, diff in stored.items():
            name = a1111_match(key.removesuffix(".diff"), layers, sd2=False)
            assert torch.equal(diff, patch.deltas[name].dense())
            get_submodule(pipe.text_encoder, name.partition(".")[2]).weight += diff  # A1111's full module
    patch.apply(bundle)
    assert_close(encodings(pipe, "sd1"), encodings(bundle.pipeline, "sd1"))
