"""Judge loading: a tiny random ViT saved locally stands in for google/vit-base-patch16-224."""

import numpy as np
import pytest
import torch
from PIL import Image

from emcid.bench.judges import DEFAULT_VIT, ViTJudge, default_judge_name, load_judge
from emcid.errors import EmcidError


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vit")
    config = ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64, num_labels=1000)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.4, 0.4],
                      image_std=[0.2, 0.3, 0.25]).save_pretrained(folder)
    return folder


def _images(count):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(count)]


def test_vit_judge_matches_a_manual_forward(tiny_vit):
    judge = ViTJudge(str(tiny_vit), batch_size=2)
    images = _images(3)
    probs = judge.predict_proba(images)
    assert probs.shape == (3, 1000)
    assert torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-5)
    # The checkpoint's own normalisation is used, not the ViT default of 0.5.
    pixels = torch.stack([torch.from_numpy(np.asarray(i.resize((32, 32), Image.BILINEAR), np.float32))
                          for i in images]).permute(0, 3, 1, 2) / 255.0
    pixels = (pixels - 0.4) / torch.tensor([0.2, 0.3, 0.25]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = judge.model(pixel_values=pixels).logits.softmax(-1)
    assert torch.allclose(probs, expected, atol=1e-5)
    assert judge.predict_proba([]).shape == (0, 1000)


def test_judge_choice_follows_the_model(tiny_bundle, tiny_vit, fake_judge):
    assert default_judge_name(tiny_bundle) == DEFAULT_VIT
    assert load_judge(tiny_bundle, fake_judge) is fake_judge
    assert isinstance(load_judge(tiny_bundle, str(tiny_vit)), ViTJudge)
    tiny_bundle.settings["world"] = "mini"  # what the embedded model's emcid.json says
    assert default_judge_name(tiny_bundle) == "mini"
    with pytest.raises(EmcidError):
        load_judge(tiny_bundle, str(tiny_vit / "missing"))
