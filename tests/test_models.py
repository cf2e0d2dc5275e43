import pytest
import torch

from emcid import load_model
from emcid.errors import ModelLoadError


def test_sd1_loads_with_diffusers_names(sd1):
    assert sd1.family == "sd1"
    for name in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
        assert getattr(sd1, name) is not None
    assert sd1.text_encoder_2 is None
    assert sd1.slot("text_encoder").fc2_name(1) == "text_encoder.text_model.encoder.layers.1.mlp.fc2"
    assert isinstance(sd1.module("text_encoder.text_model.encoder.layers.1.mlp.fc2"), torch.nn.Linear)


def test_sdxl_family_and_encoding(sdxl):
    assert sdxl.family == "sdxl"
    assert [s.name for s in sdxl.slots()] == ["text_encoder", "text_encoder_2"]
    encoding = sdxl.encode(["a photo of tench", "goldfish"])
    assert encoding.embeds.shape[-1] == 32 + 48  # both encoders' penultimate states
    assert encoding.added_text_embeds.shape == (2, 24)  # projected pooled output of encoder 2


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_model(tmp_path)


def test_a_file_or_component_as_model_says_what_it_is(tmp_path, sd1_dir):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match=r"is a file \(5 bytes\), not a diffusers pipeline"):
        load_model(tmp_path / "notes.txt")
    with pytest.raises(ModelLoadError, match="single-file checkpoint"):
        load_model(sd1_dir / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelLoadError, match="one component"):
        load_model(sd1_dir / "unet")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("missing-checkpoint.safetensors")  # a file name, never a hub id


def test_hub_id_offline_names_offline_mode(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"the hub is offline \(HF_HUB_OFFLINE=1\)"):
        load_model("someorg/not-cached-anywhere")


def test_hub_id_without_network_names_the_network(monkeypatch):
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):  # what diffusers raises when the hub cannot be resolved
        try:
            raise LocalEntryNotFoundError("cannot find the requested files in the local cache")
        except LocalEntryNotFoundError as exc:
            raise OSError("does not appear to have a file named model_index.json") from exc

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(DiffusionPipeline, "load_config", unreachable)
    with pytest.raises(ModelLoadError, match=r"hub cannot be reached \(no network\?\)"):
        load_model("someorg/not-cached-anywhere")


def test_wrong_family(sd1_dir):
    with pytest.raises(ModelLoadError, match="not sdxl"):
        load_model(sd1_dir, family="sdxl")


def test_pickle_checkpoint_refused(sd1_dir, tmp_path):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(sd1_dir, folder)
    unet = folder / "unet"
    state = load_model(sd1_dir).unet.state_dict()
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, unet / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(folder)
    assert load_model(folder, allow_pickle=True).family == "sd1"


def test_fingerprint_tracks_weights(sd1):
    before = sd1.fingerprint()
    assert before == sd1.fingerprint()
    with torch.no_grad():
        sd1.slot("text_encoder").fc2(1).weight.add_(1e-2)
    assert sd1.fingerprint() != before


def test_sd2_detected_by_openclip_width():
    from types import SimpleNamespace

    from emcid.models import detect_family

    def pipeline(width, second=None):
        encoder = SimpleNamespace(config=SimpleNamespace(hidden_size=width))
        return SimpleNamespace(text_encoder=encoder, unet=object(), text_encoder_2=second)

    assert detect_family(pipeline(768)) == "sd1"
    assert detect_family(pipeline(1024)) == "sd2"
    assert detect_family(pipeline(768, second=object())) == "sdxl"
    with pytest.raises(ModelLoadError, match="edits Stable Diffusion"):
        detect_family(SimpleNamespace(text_encoder=None, unet=None))


def test_default_model_falls_back_to_tiny_when_embedded_missing(monkeypatch, tmp_path):
    import emcid.mini
    from emcid.models import default_model_path

    monkeypatch.setattr(emcid.mini, "default_model_dir", lambda: tmp_path / "absent")
    assert (default_model_path() / "model_index.json").exists()


def test_sd2_tiny_model_is_detected_and_uses_v_prediction(tmp_path):
    from emcid.tiny import save_tiny_model

    bundle = load_model(save_tiny_model(tmp_path / "sd2", "sd2"))
    assert bundle.family == "sd2"
    assert bundle.scheduler.config.prediction_type == "v_prediction"
