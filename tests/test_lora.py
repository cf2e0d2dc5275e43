"""LoRA export: stock diffusers loads it and reproduces the patched text encoders."""

from __future__ import annotations

import pytest
import torch

from emcid import EditPatch, EmcidError, load_model
from emcid.cli import main
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
    return EditPatch.from_dense(deltas, {"family": bundle.family, "base_fingerprint": bundle.fingerprint()})


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


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_stock_diffusers_loads_fuses_and_unfuses(family, tmp_path, request):
    folder = request.getfixturevalue(f"{family}_dir")
    bundle = load_model(folder)
    base = encodings(bundle.pipeline, family)
    patch = low_rank_patch(bundle)
    patch.apply(bundle)
    patched = encodings(bundle.pipeline, family)
    assert (patched[0] - base[0]).abs().max() > 1e-2  # the edit is visible

    export = export_lora(patch, tmp_path / "edit.safetensors")
    assert export.exact and export.rank == 3
    assert sorted(export.layers) == [s.name for s in bundle.slots()]
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
    patch.save(tmp_path / "edit.safetensors")
    assert main(["export-lora", "--patch", str(tmp_path / "edit.safetensors"), "--out", str(out),
                 "--rank", "0"]) == 2
    assert "--rank 0" in capsys.readouterr().err
    assert not out.exists()
