"""Load diffusers text-to-image pipelines as :class:`~emcid.core.bundle.ModelBundle` objects,
and write pipeline folders back (atomically)."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import torch
from torch import nn

from ..errors import DeviceError, ModelLoadError
from .activations import use_fast_quick_gelu
from .bundle import ModelBundle
from .chain import PatchChain
from .checkpoint import check_allocated, load_text_encoders
from .family import COMPONENTS, EMBEDDED_TASKS, FAMILY_SAMPLING, detect_family
from .folders import recover_swap

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
SETTINGS_FILE = "emcid.json"


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


def _check_hub_id(name: str) -> None:
    """A name that is neither a folder here nor shaped like a hub id (``org/name``) is a
    mistyped folder: say so before anything mentions the hub."""
    parent = Path(name).parent
    if "/" not in name or (str(parent) != "." and parent.is_dir()):
        raise ModelLoadError(f"no folder {name!r} (and it is not a hub id, which looks like "
                             "'org/name'): give a diffusers pipeline folder or a hub id")


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


def _check_local_folder(folder: Path, allow_pickle: bool) -> dict:
    """A local pipeline folder's index (``model_index.json``), once the folder is swapped in
    whole, the index readable and no unasked pickles."""
    recover_swap(folder)  # a folder an interrupted `emcid apply` left half swapped
    path = folder / "model_index.json"
    if not path.is_file():
        raise ModelLoadError(_not_a_pipeline(folder))
    try:
        index = json.loads(path.read_text())
        if not isinstance(index, dict):
            raise ValueError("it is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not a valid diffusers index ({exc}); restore it from "
                             "the model's source") from None
    pickles = _local_pickles(folder)
    if pickles and not allow_pickle:
        raise ModelLoadError(
            f"{pickles[0]} is a pickle checkpoint, which can run arbitrary code when loaded; "
            "convert it to safetensors or pass allow_pickle=True (--allow-pickle) if you trust it")
    return index


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
    elif device.type == "meta":
        raise DeviceError("the meta device holds no weights; use --device cpu or cuda")
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError) as exc:  # e.g. mps on a torch built without it
            reason = " ".join(str(exc).split())[:160]
            raise DeviceError(f"device {str(device)!r} is not usable with this torch build "
                              f"({reason}); use --device cpu") from None
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
    source, components, draws = None if id_or_path is None else str(id_or_path), {}, []
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
        index = _check_local_folder(local, allow_pickle)
        checked = load_text_encoders(local, index, dtype, allow_pickle, skip=tuple(components))
        components = {**checked, **components}
    else:
        _check_hub_id(id_or_path)
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
    check_allocated(pipeline, local if looks_local else None)
    detected = detect_family(pipeline)
    if family is not None and family != detected:
        raise ModelLoadError(f"{id_or_path!r} is an {detected} model, not {family}")
    pipeline.to(device)
    freeze_components(pipeline)
    settings = _read_settings(local) if looks_local else {}
    if source == EMBEDDED_TASKS:
        settings = {**settings, "tasks": draws}
    sampling = {k: settings.get(k, v) for k, v in FAMILY_SAMPLING[detected].items()}
    chain = PatchChain.read(local) if looks_local else PatchChain()
    name = source if source == EMBEDDED_TASKS else id_or_path
    return ModelBundle(pipeline, detected, name, sampling, settings, chain=chain)


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

    from ..mini import tasks_dir

    folder = tasks_dir()
    if not (folder / "unet" / "config.json").is_file() or not (folder / "tasks.json").is_file():
        raise ModelLoadError(f"{EMBEDDED_TASKS!r}: its UNet is not installed ({folder} has no "
                             "unet/config.json or tasks.json)")
    components = {"unet": UNet2DConditionModel.from_pretrained(folder / "unet", dtype=dtype)}
    if (folder / "text_encoder" / "config.json").is_file():
        components["text_encoder"] = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype)
    return components, list(json.loads((folder / "tasks.json").read_text())["draws"])


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
        from ..mini import default_model_dir

        folder = default_model_dir()
        if (folder / "model_index.json").exists():
            return folder
    except ImportError:
        pass
    from ..tiny import ensure_tiny_model

    log.warning("the embedded model is not installed; using a tiny random test model")
    return ensure_tiny_model("sd1")
