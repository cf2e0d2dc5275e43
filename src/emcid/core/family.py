"""Facts about the model families emcid edits: names, module templates, sampling defaults."""

from __future__ import annotations

from ..errors import ModelLoadError

FAMILIES = ("sd1", "sd2", "sdxl")
FC2_TEMPLATE = "text_model.encoder.layers.{}.mlp.fc2"
BLOCK_TEMPLATE = "text_model.encoder.layers.{}"
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")  # what a fingerprint covers
#: The embedded model with its own UNet (and text encoder) that also draw words of its world's
#: task vocabulary (emcid/mini/styles.py; which ones: ``bundle.settings["tasks"]``).
EMBEDDED_TASKS = "embedded:tasks"

# Sampling defaults of each family's reference pipeline; a model folder may override them
# with an ``emcid.json`` file (the embedded model does).
FAMILY_SAMPLING = {
    "sd1": {"num_inference_steps": 50, "guidance_scale": 7.5, "height": 512, "width": 512},
    "sd2": {"num_inference_steps": 50, "guidance_scale": 7.5, "height": 768, "width": 768},
    "sdxl": {"num_inference_steps": 50, "guidance_scale": 7.5, "height": 1024, "width": 1024},
}


def detect_family(pipeline: object) -> str:
    """SDXL has a second text encoder; SD 2.x an OpenCLIP encoder (width 1024, exact GELU)."""
    if getattr(pipeline, "text_encoder", None) is None or getattr(pipeline, "unet", None) is None:
        raise ModelLoadError(
            f"{type(pipeline).__name__} has no text_encoder/unet: emcid edits Stable Diffusion "
            "1.x, 2.x and SDXL pipelines only"
        )
    if getattr(pipeline, "text_encoder_2", None) is not None:
        return "sdxl"
    config = pipeline.text_encoder.config
    # OpenCLIP encoders (SD 2.x) use exact GELU; OpenAI's CLIP (SD 1.x) uses quick_gelu.
    openclip = config.hidden_size == 1024 or getattr(config, "hidden_act", "") == "gelu"
    return "sd2" if openclip else "sd1"
