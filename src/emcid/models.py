"""Load diffusers text-to-image pipelines and expose what the editors need.

A :class:`ModelBundle` keeps diffusers' own component names (``tokenizer``, ``text_encoder``,
``tokenizer_2``, ``text_encoder_2``, ``unet``, ``vae``, ``scheduler``) and adds the family,
a content fingerprint, prompt encoding exactly as the family's pipeline does it, and the
names of the editable ``fc2`` modules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .activations import use_fast_quick_gelu
from .errors import DeviceError, ModelLoadError

log = logging.getLogger(__name__)

FAMILIES = ("sd1", "sd2", "sdxl")
FC2_TEMPLATE = "text_model.encoder.layers.{}.mlp.fc2"
BLOCK_TEMPLATE = "text_model.encoder.layers.{}"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
SETTINGS_FILE = "emcid.json"
HISTORY_DIR = "emcid_history"  # a patched pipeline folder's patch chain (written by apply)
HISTORY_FILE = "chain.json"
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


@dataclass
class TextEncoderSlot:
    """One tokenizer + text encoder pair, named as in the pipeline (``text_encoder[_2]``)."""

    name: str
    tokenizer: object
    encoder: nn.Module

    @property
    def num_layers(self) -> int:
        return self.encoder.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    def block(self, layer: int) -> nn.Module:
        return get_submodule(self.encoder, BLOCK_TEMPLATE.format(layer))

    def fc2(self, layer: int) -> nn.Linear:
        return get_submodule(self.encoder, FC2_TEMPLATE.format(layer))

    def fc2_name(self, layer: int) -> str:
        """Module name relative to the pipeline, as patches and statistics store it."""
        return f"{self.name}.{FC2_TEMPLATE.format(layer)}"

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids padded to the tokenizer's full length, as the SD pipelines do."""
        return self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.encoder.device)


@dataclass
class PromptEncoding:
    """What the UNet is conditioned on, plus what the text alignment loss compares."""

    embeds: torch.Tensor
    pooled: list[torch.Tensor]
    added_text_embeds: torch.Tensor | None = None


@dataclass
class ModelBundle:
    """A loaded pipeline with its family, source and generation defaults."""

    pipeline: object
    family: str
    source: str
    sampling: dict
    settings: dict = field(default_factory=dict)
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    applied: list = field(default_factory=list)
    # Patches recorded in the folder this model was loaded from (oldest first), each with the
    # path of the weights it replaced, and the fingerprint the folder had when written.
    history: list[dict] = field(default_factory=list)
    recorded_fingerprint: str | None = None

    def __getattr__(self, name: str):
        # Component names are diffusers' own: bundle.unet, bundle.text_encoder_2, ...
        if name in ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "unet", "vae",
                    "scheduler"):
            return getattr(self.pipeline, name, None)
        raise AttributeError(name)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def is_embedded(self) -> bool:
        """True for the project's own miniature model (it carries its own world)."""
        return self.settings.get("world") == "mini"

    def slots(self) -> list[TextEncoderSlot]:
        slots = [TextEncoderSlot("text_encoder", self.tokenizer, self.text_encoder)]
        if self.family == "sdxl":
            slots.append(TextEncoderSlot("text_encoder_2", self.tokenizer_2, self.text_encoder_2))
        return slots

    def slot(self, name: str) -> TextEncoderSlot:
        for slot in self.slots():
            if slot.name == name:
                return slot
        raise KeyError(f"this {self.family} model has no component {name!r}")

    def module(self, name: str) -> nn.Module:
        component, _, rest = name.partition(".")
        return get_submodule(getattr(self.pipeline, component), rest)

    def fingerprint(self, components: tuple[str, ...] = COMPONENTS) -> str:
        return fingerprint(self, components)

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids of ``prompts`` for each text encoder, in ``slots()`` order."""
        return [slot.tokenize(prompts) for slot in self.slots()]

    def encode(self, prompts: list[str]) -> PromptEncoding:
        """Encode prompts exactly as the family's diffusers pipeline does (gradients kept)."""
        return self.encode_ids(self.tokenize(prompts))

    def encode_ids(self, ids: list[torch.Tensor]) -> PromptEncoding:
        """``encode`` from ``tokenize``'s ids: a loop that encodes the same prompts many times
        (Stage I) tokenises them once."""
        if self.family != "sdxl":
            out = self.text_encoder(ids[0])
            return PromptEncoding(out.last_hidden_state, [out.pooler_output])
        states, pooled = [], []
        for slot, slot_ids in zip(self.slots(), ids, strict=True):
            out = slot.encoder(slot_ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            # CLIPTextModelWithProjection returns its projected pooled state as text_embeds.
            projected = getattr(out, "text_embeds", None)
            pooled.append(projected if projected is not None else out.pooler_output)
        return PromptEncoding(torch.cat(states, dim=-1), pooled, projected)

    def unet_kwargs(self, encoding: PromptEncoding, height: int, width: int) -> dict:
        """Extra UNet inputs: SDXL's pooled text embedding and size/crop conditioning."""
        if self.family != "sdxl":
            return {}
        batch = encoding.embeds.shape[0]
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=encoding.embeds.dtype)
        return {
            "added_cond_kwargs": {
                "text_embeds": encoding.added_text_embeds,
                "time_ids": time_ids.to(encoding.embeds.device).repeat(batch, 1),
            }
        }

    def latent_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """Resolve a checkpoint-style name (``text_model.encoder...``) on any transformers version.

    transformers 5 dropped the ``text_model`` wrapper inside ``CLIPTextModel``; checkpoints and
    our patches keep the original names, so both spellings resolve.
    """
    try:
        return model.get_submodule(path)
    except AttributeError:
        prefix = "text_model."
        alternative = path[len(prefix):] if path.startswith(prefix) else prefix + path
        return model.get_submodule(alternative)


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


def fingerprint(bundle: ModelBundle, components: tuple[str, ...] = COMPONENTS, sample: int = 4096) -> str:
    """A fast content hash of the model as it is now.

    Hashes the family, every tensor's name, shape and a strided sample of its values (rounded
    to float16, so an fp16 load of the same weights fingerprints alike). Any edit of an fc2
    weight changes nearly every entry, so the sample sees it.
    """
    digest = hashlib.sha256(bundle.family.encode())
    for component in components:
        module = getattr(bundle.pipeline, component, None)
        if module is None:
            continue
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            step = max(flat.numel() // sample, 1)
            values = flat[::step][:sample].to("cpu", torch.float16)
            digest.update(f"{component}.{name}{tuple(tensor.shape)}".encode())
            digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:24]


def _local_pickles(folder: Path) -> list[Path]:
    weights = [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    safe = {p.parent for p in folder.rglob("*.safetensors")}
    return [p for p in weights if p.parent not in safe]


def _hub_problem(id_or_path: str, exc: BaseException) -> str | None:
    """Name offline mode or an unreachable hub, which diffusers reports as a missing file."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    cache = constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE or any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        return (f"hub id {id_or_path!r} is not in the local hub cache ({cache}) and the hub is "
                "offline (HF_HUB_OFFLINE=1): download it while online, or give a local folder")
    if any(isinstance(e, (LocalEntryNotFoundError, ConnectionError, socket.gaierror)) for e in chain):
        return (f"the Hugging Face hub cannot be reached (no network?) and {id_or_path!r} is not "
                f"in the local hub cache ({cache}): connect, or give a local folder")
    return None


def _pipeline_class_name(id_or_path: str) -> str:
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(id_or_path)
    except Exception as exc:  # diffusers raises OSError, EnvironmentError, HTTP errors ...
        problem = _hub_problem(id_or_path, exc) or (
            f"cannot read a diffusers pipeline from {id_or_path!r}: {exc}. Give a folder written "
            "by save_pretrained (it holds model_index.json) or a hub id")
        raise ModelLoadError(problem) from exc
    return config.get("_class_name", "")


def _not_a_pipeline(path: Path) -> str:
    """What a local path given as a model is, when it is not a pipeline folder."""
    if path.is_dir():
        hint = (" (it holds config.json: one component; give the pipeline folder above it)"
                if (path / "config.json").exists() else "")
        return f"{str(path)!r} is not a diffusers pipeline folder: model_index.json is missing{hint}"
    if not path.exists():
        return (f"model folder {str(path)!r} does not exist (give a diffusers pipeline folder or "
                "a hub id like 'org/name')")
    if not path.is_file():
        return f"{str(path)!r} is neither a folder nor a file"
    what = f"{str(path)!r} is a file ({path.stat().st_size:,} bytes), not a diffusers pipeline folder"
    if path.suffix == ".safetensors":
        from .cache import read_metadata

        try:
            if "emcid" in read_metadata(path):
                return f"{what}: it is an emcid patch; pass it as --patch and the model as --model"
        except Exception:  # not readable as safetensors: described as a plain file below
            pass
    if path.suffix in (".safetensors", *PICKLE_SUFFIXES):
        return (f"{what}; if it is a single-file checkpoint, convert it once with diffusers "
                "(StableDiffusionPipeline.from_single_file(path).save_pretrained(folder))")
    return f"{what} (a folder holding model_index.json, written by save_pretrained)"


def check_device(device: str | torch.device) -> torch.device:
    """The device, or a clear error when this machine does not have it."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"{device!r} is not a device name (try 'cpu', 'cuda' or 'cuda:1')") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {str(device)!r} requested, but this machine (or this torch "
                              "build) has no CUDA device; use --device cpu")
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {str(device)!r} requested, but this machine has {count} CUDA "
                              f"device(s): cuda:0..cuda:{count - 1}")
    return device


def load_model(
    id_or_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    family: str | None = None,
    allow_pickle: bool = False,
) -> ModelBundle:
    """Load a Stable Diffusion 1.x / 2.x / SDXL pipeline from a diffusers folder or hub id.

    With no argument, the embedded miniature model is loaded. Pickle checkpoints (.bin/.ckpt)
    execute code when loaded and are refused unless ``allow_pickle`` is set. ``family`` checks
    the detected family against what the caller expects.
    """
    from diffusers import DiffusionPipeline

    device = check_device(device)
    source, components = None if id_or_path is None else str(id_or_path), {}
    if source == EMBEDDED_TASKS:
        components, draws = _embedded_tasks_components(dtype)
        id_or_path = None
    if id_or_path is None:
        id_or_path = default_model_path()
    id_or_path = str(id_or_path)
    local = Path(id_or_path)
    looks_local = (local.exists() or id_or_path.startswith((".", "/", "~")) or id_or_path.count("/") > 1
                   or local.suffix in (".safetensors", *PICKLE_SUFFIXES))
    if looks_local:
        if not (local / "model_index.json").is_file():
            raise ModelLoadError(_not_a_pipeline(local))
        pickles = _local_pickles(local)
        if pickles and not allow_pickle:
            raise ModelLoadError(
                f"{pickles[0]} is a pickle checkpoint, which can run arbitrary code when loaded; "
                "convert it to safetensors or pass allow_pickle=True (--allow-pickle) if you trust it"
            )
    class_name = _pipeline_class_name(id_or_path)
    kwargs = {}
    if class_name in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"):
        kwargs = {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipeline = DiffusionPipeline.from_pretrained(
            id_or_path, dtype=dtype, use_safetensors=None if allow_pickle else True, **kwargs,
            **components)
    except Exception as exc:
        problem = None if looks_local else _hub_problem(id_or_path, exc)
        raise ModelLoadError(problem or f"cannot load {id_or_path!r}: {exc}") from exc
    detected = detect_family(pipeline)
    if family is not None and family != detected:
        raise ModelLoadError(f"{id_or_path!r} is an {detected} model, not {family}")
    pipeline.to(device)
    freeze_components(pipeline)
    settings = _read_settings(local) if looks_local else {}
    if components:
        settings = {**settings, "tasks": draws}
    sampling = {k: settings.get(k, v) for k, v in FAMILY_SAMPLING[detected].items()}
    history, recorded = _read_history(local) if looks_local else ([], None)
    return ModelBundle(pipeline, detected, source if components else id_or_path, sampling, settings,
                       history=history, recorded_fingerprint=recorded)


def freeze_components(pipeline) -> None:
    """Every model component frozen and in eval mode (edits change weights by closed form, never
    by gradients), and the text encoders' quick_gelu computed the faster way (same function)."""
    for name in COMPONENTS:
        module = getattr(pipeline, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
            if name.startswith("text_encoder"):
                use_fast_quick_gelu(module)


def _embedded_tasks_components(dtype: torch.dtype) -> tuple[dict[str, nn.Module], list[str]]:
    """The parts of ``EMBEDDED_TASKS`` that replace the embedded pipeline's (shipped beside it,
    float16 on disk: the UNet, and the text encoder where it was fine-tuned for styles) and
    what it draws beyond the world's objects (its ``tasks.json``: "colour_words", "styles")."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from .mini import tasks_dir

    folder = tasks_dir()
    if not (folder / "unet" / "config.json").is_file() or not (folder / "tasks.json").is_file():
        raise ModelLoadError(f"{EMBEDDED_TASKS!r}: its UNet is not installed ({folder} has no "
                             "unet/config.json or tasks.json)")
    components = {"unet": UNet2DConditionModel.from_pretrained(folder / "unet", dtype=dtype)}
    if (folder / "text_encoder" / "config.json").is_file():
        components["text_encoder"] = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype)
    return components, list(json.loads((folder / "tasks.json").read_text())["draws"])


def _read_history(folder: Path) -> tuple[list[dict], str | None]:
    """The patch chain a folder written by ``emcid apply`` carries (none for a plain model)."""
    path = folder / HISTORY_DIR / HISTORY_FILE
    if not path.exists():
        return [], None
    try:
        chain = json.loads(path.read_text())
        steps = [{**step, "originals": str(path.parent / step["originals"])}
                 for step in chain["steps"]]
        return steps, chain["model_fingerprint"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{path} is corrupted ({exc!r}); delete {path.parent} to use the "
                             "model without its patch chain") from None


def _read_settings(folder: Path) -> dict:
    path = folder / SETTINGS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def write_settings(bundle: ModelBundle, folder: str | os.PathLike) -> None:
    """Carry the model's emcid settings (sampling defaults, world) into an exported folder."""
    if bundle.settings:
        Path(folder, SETTINGS_FILE).write_text(json.dumps(bundle.settings, indent=2))


def default_model_path() -> Path:
    """The embedded model if it is installed, else a tiny random model built on first use."""
    try:
        from .mini import default_model_dir

        folder = default_model_dir()
        if (folder / "model_index.json").exists():
            return folder
    except ImportError:
        pass
    from .tiny import ensure_tiny_model

    log.warning("the embedded model is not installed; using a tiny random test model")
    return ensure_tiny_model("sd1")
