"""Stage I: per-concept target values by dual self-distillation (docs/method.md).

For one request, a vector ``delta`` per edited text encoder is added to the output of its
last edited block ``l*`` at the subject token of every source prompt. ``delta`` is optimised
so that the edited encoder on the source prompts makes (1) the UNet predict what the
unedited model predicts on the destination prompts, on the same noisy latents of source
images, and (2) the pooled text output match the unedited encoder's on the destination.
No weight changes here; the result is the target ``z = h + delta`` at ``l*`` per prompt.
"""

from __future__ import annotations

import gc
import hashlib
import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from diffusers import DDPMScheduler
from PIL import Image

from ...cache import TensorCache, content_key
from ...config import Runtime, check_choice, check_float, check_int
from ...errors import EmcidError, Stage1DivergedError
from ...generation import encode_images, generate_cached, pil_to_tensor, resolve_settings
from ...hooks import add_at_positions, capture, gather_positions, replay_prefix
from ...models import ModelBundle, PromptEncoding
from ...requests import EditRequest, subject_positions

log = logging.getLogger(__name__)


Precision = Literal["auto", "fp32", "bf16", "fp16"]
FP16_LOSS_SCALE = 1024.0  # fp16 gradients of a small MSE would underflow unscaled


@dataclass
class Stage1Config:
    """Stage I hyperparameters; defaults are the release values for SD 1.x (docs/method.md).

    Presets for SDXL and artists live in ``emcid.editors.presets``.
    """

    steps: int = 200  # release: 200 (100 for artists, 100 for SDXL)
    lr: float = 0.2  # release: Adam 0.2 (SDXL 0.1)
    noise_weight: float = 1.0  # release: weight of the diffusion noise prediction loss
    align_weight: float = 0.01  # release: 0.01 for SD 1.x, 0.005 for SDXL
    norm_decay: float = 5e-4  # release: 5e-4 * ||delta|| / ||v_src||^2
    clamp_factor: float = 1.5  # release: ||delta|| <= 1.5 ||v_src|| (SDXL 1.2)
    target: Literal["teacher", "noise"] = "teacher"  # "noise": regress on the true noise
    image_guidance_scale: float | None = 7.5  # release: source images at guidance 7.5
    image_steps: int | None = 50  # release: 50 sampling steps; None = the model's default
    # Where delta starts. "text" (emcid): the destination's state at l* minus the source's, at
    # their subject tokens (far edits otherwise settle on a third concept, docs/method.md);
    # "zero": the release's start.
    init: Literal["text", "zero"] = "text"

    def __post_init__(self) -> None:
        check_int("Stage I", "steps", self.steps)
        check_float("Stage I", "lr", self.lr, low=0, low_open=True)
        for name in ("noise_weight", "align_weight", "norm_decay"):
            check_float("Stage I", name, getattr(self, name), low=0)
        check_float("Stage I", "clamp_factor", self.clamp_factor, low=0, low_open=True)
        check_choice("Stage I", "target", self.target, ("teacher", "noise"))
        check_choice("Stage I", "init", self.init, ("text", "zero"))
        if self.image_guidance_scale is not None:
            check_float("Stage I", "image_guidance_scale", self.image_guidance_scale, low=0)
        if self.image_steps is not None:
            check_int("Stage I", "image_steps", self.image_steps)


def resolve_precision(precision: Precision, device: torch.device) -> str:
    """``auto``: bf16 on a CUDA device that has it (fp16 on older ones), fp32 elsewhere (CPU
    autocast is slower than fp32 on most CPUs)."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@dataclass
class ConceptTarget:
    """Stage I's result for one request, per edited text encoder (by component name)."""

    request: EditRequest
    z_layer: dict[str, int]
    deltas: dict[str, torch.Tensor]  # (width,)
    source_hidden: dict[str, torch.Tensor]  # unedited h at l*, (n_prompts, width)
    final_loss: float

    def targets(self, slot: str) -> torch.Tensor:
        """z = h + delta at l* for every source prompt: (n_prompts, width)."""
        return self.source_hidden[slot] + self.deltas[slot]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"delta.{k}": v for k, v in self.deltas.items()}
        tensors.update({f"hidden.{k}": v for k, v in self.source_hidden.items()})
        tensors["final_loss"] = torch.tensor(self.final_loss)
        return tensors

    @classmethod
    def from_tensors(cls, request: EditRequest, z_layer: dict[str, int],
                     tensors: dict[str, torch.Tensor]) -> ConceptTarget:
        return cls(
            request, z_layer,
            {k: tensors[f"delta.{k}"] for k in z_layer},
            {k: tensors[f"hidden.{k}"] for k in z_layer},
            float(tensors["final_loss"]),
        )


def _reference_images(request: EditRequest, height: int, width: int) -> torch.Tensor:
    images = []
    for path in request.reference_images:
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
    count = len(request.prompts)
    # Pair images with prompts round-robin, so every prompt sees an image.
    chosen = [images[i % len(images)] for i in range(max(count, len(images)))]
    return pil_to_tensor(chosen, height, width)


def source_latents(bundle: ModelBundle, requests: list[EditRequest], config: Stage1Config,
                   image_cache: TensorCache) -> list[torch.Tensor]:
    """VAE latents of each request's source images: the user's references, or generated once
    and cached (one cache lookup for all requests, so the model is fingerprinted once)."""
    settings = resolve_settings(bundle, guidance_scale=config.image_guidance_scale,
                                num_inference_steps=config.image_steps)
    drawn = [r for r in requests if not r.reference_images]
    prompts = [p for r in drawn for p in r.source_prompts()]
    seeds = [r.seed + i for r in drawn for i in range(len(r.prompts))]
    arrays = generate_cached(bundle, prompts, seeds, image_cache, progress=False, **settings) \
        if drawn else None
    latents, start = [], 0
    for request in requests:
        if request.reference_images:
            pixels = _reference_images(request, settings["height"], settings["width"])
        else:
            count = len(request.prompts)
            pixels = arrays[start:start + count].permute(0, 3, 1, 2).float() / 127.5 - 1.0
            start += count
        latents.append(encode_images(bundle, pixels))
    return latents


def _read_block_outputs(bundle: ModelBundle, prompts: list[str],
                        z_layer: dict[str, int]) -> dict[str, torch.Tensor]:
    """Unedited outputs of every edited encoder's block l* at every token (what Stage I
    replays, and where it reads the states at the subject)."""
    with torch.no_grad(), ExitStack() as stack:
        records = {name: stack.enter_context(capture({name: bundle.slot(name).block(layer)}))
                   for name, layer in z_layer.items()}
        bundle.encode(prompts)
    return {name: records[name][name][0].float() for name in z_layer}


def cache_key_for(bundle_fingerprint: str, request: EditRequest, z_layer: dict[str, int],
                  config: Stage1Config, image_settings: dict, device: torch.device,
                  precision: Precision = "auto") -> str:
    """Everything a Stage I result depends on: model, request (prompts, seed, images), config,
    and the precision where it is not fp32 (so fp32 keys are the same on every device)."""
    images = [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in request.reference_images]
    hyper = asdict(config)
    if hyper["init"] == "zero":
        del hyper["init"]  # the release's start, as every key made before the option had it
    precision = resolve_precision(precision, device)
    if precision != "fp32":
        hyper["precision"] = precision
    return content_key(model=bundle_fingerprint, request=request.to_dict(), images=images,
                       z_layer=z_layer, config=hyper, image_settings=image_settings)


class Stage1OutOfMemoryError(EmcidError, MemoryError):
    """Even one concept at a time does not fit in the device's memory."""


@dataclass
class _Batch:
    """Several concepts' rows laid out as one tensor program (one row per source image)."""

    requests: list[EditRequest]
    owner: torch.Tensor  # concept index of each row
    src_prompts: list[str]
    dst_prompts: list[str]
    positions: dict[str, torch.Tensor]  # subject token of each row, per text encoder
    latents: torch.Tensor | None  # None when the noise-prediction loss is off
    prefix: dict[str, torch.Tensor]  # unedited output of block l* at every token of every row
    hidden: dict[str, list[torch.Tensor]]  # per concept: unedited h at l*, (n_prompts, width)
    text_estimate: dict[str, torch.Tensor] | None  # (concepts, width): h_dst - h_src at l*


def _layout(bundle: ModelBundle, requests: list[EditRequest], z_layer: dict[str, int],
            config: Stage1Config, image_cache: TensorCache) -> _Batch:
    """Rows of every concept, with the unedited states of block l* read in one pass.

    A concept's rows cycle through its prompts and there are at least as many rows as
    prompts, so its first rows hold the states at the subject of each prompt in turn.
    """
    latents = source_latents(bundle, requests, config, image_cache) if config.noise_weight else []
    owner, src, dst, firsts = [], [], [], []
    positions: dict[str, list[torch.Tensor]] = {name: [] for name in z_layer}
    for index, request in enumerate(requests):
        count = len(request.prompts)
        # text-only targets need no images: one row per prompt
        rows = torch.arange(latents[index].shape[0] if config.noise_weight else count) % count
        firsts.append(torch.arange(count) + len(owner))
        owner += [index] * len(rows)
        src += [request.source_prompts()[i] for i in rows]
        dst += [request.destination_prompts()[i] for i in rows]
        for name in z_layer:
            tokens = subject_positions(bundle.slot(name).tokenizer, request.prompts, request.source)
            positions[name].append(tokens[rows])
    row_positions = {n: torch.cat(p) for n, p in positions.items()}
    prefix = _read_block_outputs(bundle, src, z_layer)
    hidden = {}
    for name, states in prefix.items():
        at_subject = gather_positions(states, row_positions[name])
        hidden[name] = [at_subject[rows] for rows in firsts]
    estimate = _text_estimate(bundle, requests, z_layer, hidden) if config.init == "text" else None
    return _Batch(requests, torch.tensor(owner), src, dst, row_positions,
                  torch.cat(latents) if latents else None, prefix, hidden, estimate)


def _text_estimate(bundle: ModelBundle, requests: list[EditRequest], z_layer: dict[str, int],
                   hidden: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per concept, the mean over its prompts of h_dst - h_src at l*: the unedited block-l*
    state at the destination's last token in the destination prompt, minus the source's.

    It is where Stage I starts: swapping that state alone draws the destination, and from
    there the loss has a minimum that still does, where from zero a far edit settles on a
    minimum that draws a third concept (docs/method.md, "Stage I's start"). An empty
    destination (an erase on Stable Diffusion) has no token to read: it starts from zero.
    """
    worded = [r for r in requests if r.destination.strip()]
    states = _read_block_outputs(bundle, [p for r in worded for p in r.destination_prompts()], z_layer) \
        if worded else {}
    estimate = {}
    for name in z_layer:
        tokenizer = bundle.slot(name).tokenizer
        rows, start = [], 0
        for request, h in zip(requests, hidden[name], strict=True):
            if not request.destination.strip():
                rows.append(torch.zeros_like(h[0]))
                continue
            count = len(request.prompts)
            positions = subject_positions(tokenizer, request.prompts, request.destination)
            at_destination = gather_positions(states[name][start:start + count], positions)
            rows.append((at_destination - h).mean(0))
            start += count
        estimate[name] = torch.stack(rows)
    return estimate


def _draw_noise(batch: _Batch, generators: list[torch.Generator], train_steps: int,
                count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps (count, rows) and noise (count, rows, ...) for the next ``count`` steps, each
    concept from its own generator in step order (so independent of batch and of ``count``),
    moved to the device in one copy rather than once per step."""
    shape = batch.latents.shape[1:]
    timesteps, noise = [], []
    for index, generator in enumerate(generators):
        rows = int((batch.owner == index).sum())
        draws = [(torch.randint(0, train_steps, (rows,), generator=generator),
                  torch.randn((rows, *shape), generator=generator)) for _ in range(count)]
        timesteps.append(torch.stack([t for t, _ in draws]))
        noise.append(torch.stack([n for _, n in draws]))
    device = batch.latents.device
    return torch.cat(timesteps, 1).to(device), torch.cat(noise, 1).to(device, batch.latents.dtype)


@contextmanager
def _unet_mode(unet: torch.nn.Module, grad_checkpointing: bool) -> Iterator[None]:
    """Gradient checkpointing of the UNet for the duration of Stage I only."""
    was = getattr(unet, "is_gradient_checkpointing", False)
    if grad_checkpointing and not was:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if grad_checkpointing and not was:
            unet.disable_gradient_checkpointing()


@dataclass
class _Noising:
    """DDPM's training-time noising with its tables on the device once (no copy per step)."""

    alphas: torch.Tensor
    velocity: bool

    @classmethod
    def of(cls, scheduler, device: torch.device, dtype: torch.dtype) -> _Noising:
        return cls(scheduler.alphas_cumprod.to(device, dtype),
                   scheduler.config.prediction_type == "v_prediction")

    def scales(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.alphas[t]
        return (alpha ** 0.5).view(-1, 1, 1, 1), ((1 - alpha) ** 0.5).view(-1, 1, 1, 1)


def _encode_edited(bundle: ModelBundle, ids: list[torch.Tensor], z_layer: dict[str, int],
                   prefix: dict[str, torch.Tensor], positions: dict[str, torch.Tensor],
                   vectors: dict[str, torch.Tensor]) -> PromptEncoding:
    """Stage I's text pass: ``ids`` encoded with block l*'s recorded output replayed (nothing
    before it depends on delta) and ``vectors`` added there at each row's subject token."""
    with ExitStack() as stack:
        for name, layer in z_layer.items():
            slot = bundle.slot(name)
            stack.enter_context(replay_prefix([slot.block(i) for i in range(layer + 1)], prefix[name]))
            stack.enter_context(add_at_positions(slot.block(layer), positions[name], vectors[name]))
        return bundle.encode_ids(ids)


def _edited_unet_kwargs(teacher_kwargs: dict, edited: PromptEncoding) -> dict:
    """The teacher's extra UNet inputs with the edited pooled text embedding (SDXL). The size
    conditioning is made once, before the steps: a copy from the host cannot be in a CUDA graph."""
    if "added_cond_kwargs" not in teacher_kwargs:
        return teacher_kwargs
    return {"added_cond_kwargs": {**teacher_kwargs["added_cond_kwargs"],
                                  "text_embeds": edited.added_text_embeds}}


def _noise_loss(bundle: ModelBundle, noising: _Noising, latents: torch.Tensor, noise: torch.Tensor,
                t: torch.Tensor, edited: PromptEncoding, teacher: PromptEncoding,
                teacher_kwargs: dict, target: str, precision: str,
                autocast_cache: bool = True) -> torch.Tensor:
    """Per-row MSE between the UNet's prediction under the edited conditioning and the
    unedited model's prediction under the destination's (or the true noise / velocity).

    The UNet runs under autocast at ``precision`` (its cache of cast weights off where a CUDA
    graph is captured, as capture requires); the loss is float32.
    """
    signal, sigma = noising.scales(t)
    noisy = signal * latents + sigma * noise
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast(bundle.device.type, dtype=dtype, enabled=dtype is not None,
                        cache_enabled=autocast_cache):
        prediction = bundle.unet(noisy, t, encoder_hidden_states=edited.embeds,
                                 **_edited_unet_kwargs(teacher_kwargs, edited)).sample
        with torch.no_grad():  # the teacher: once per (concept, timestep draw), no graph
            if target == "noise":
                goal = signal * noise - sigma * latents if noising.velocity else noise
            else:
                goal = bundle.unet(noisy, t, encoder_hidden_states=teacher.embeds,
                                   **teacher_kwargs).sample
    return (prediction.float() - goal.float()).pow(2).flatten(1).mean(1)


def _concept_state(deltas: dict[str, torch.Tensor], optimiser: torch.optim.Optimizer,
                   generator: torch.Generator, index: int, step: int) -> dict[str, torch.Tensor]:
    """What resuming one concept after ``step`` steps needs: delta, Adam moments, noise state."""
    state = {"step": torch.tensor(step), "generator": generator.get_state()}
    for name, delta in deltas.items():
        moments = optimiser.state.get(delta, {})
        state[f"delta.{name}"] = delta[index].detach().cpu()
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in moments:
                state[f"{moment}.{name}"] = moments[moment][index].cpu()
    return state


def _restore(states: list[dict[str, torch.Tensor]], deltas: dict[str, torch.Tensor],
             optimiser: torch.optim.Optimizer, generators: list[torch.Generator]) -> int:
    """Load saved concept states (all at the same step); returns that step."""
    step = int(states[0]["step"])
    with torch.no_grad():
        on_device = optimiser.defaults["capturable"]  # a CUDA graph replays Adam's step count
        for name, delta in deltas.items():
            delta.copy_(torch.stack([s[f"delta.{name}"] for s in states]))
            optimiser.state[delta] = {
                "step": torch.tensor(float(step), device=delta.device if on_device else None),
                **{m: torch.stack([s[f"{m}.{name}"] for s in states]).to(delta)
                   for m in ("exp_avg", "exp_avg_sq")},
            }
    for generator, state in zip(generators, states, strict=True):
        generator.set_state(state["generator"])
    return step


def _check_health(requests: list[EditRequest], first_bad: torch.Tensor, overflow: torch.Tensor,
                  moves: dict[str, torch.Tensor] | None = None) -> None:
    """One host sync: fail naming the first concept whose loss went NaN/inf, whose delta
    overflowed, or (``moves`` given, at the end: each delta minus its start) whose delta
    never moved."""
    moved = None
    if moves is not None:
        moved = torch.stack([m.abs().amax(1) > 0 for m in moves.values()]).all(0).cpu()
    first_bad, overflow = first_bad.cpu(), overflow.cpu()
    for index, request in enumerate(requests):
        name = f"{request.source!r} -> {request.destination!r}"
        if first_bad[index] >= 0:
            raise Stage1DivergedError(
                f"Stage I diverged for {name} at step {int(first_bad[index])}: the loss is not "
                "finite; lower the learning rate (--lr) or check the model")
        if overflow[index] >= 0:
            raise Stage1DivergedError(
                f"Stage I diverged for {name} at step {int(overflow[index])}: delta overflowed "
                "(its norm is not finite); lower the learning rate (--lr)")
        if moved is not None and not moved[index]:
            raise Stage1DivergedError(
                f"Stage I did not move delta for {name}: it has not left its start; "
                "check the learning rate (--lr) and that the subject reaches the loss")


ProgressHook = Callable[[list[dict[str, torch.Tensor]]], None]
StepFunction = Callable[[torch.Tensor | None, torch.Tensor | None], None]


class _Stepper:
    """Runs Stage I steps, each ``step(t, noise)`` with no host sync and every effect in place.

    On CUDA with ``graphs``, the first ``WARMUP`` steps run eagerly on a side stream (as
    capture requires), then one step is captured as a CUDA graph and every later step replays
    it: a small model's step is bound by kernel launches there, and a replay launches once. A
    capture that fails (an operation capture cannot hold) falls back to eager steps, with a
    warning; an out-of-memory error propagates, so the caller can halve the batch.
    """

    WARMUP = 3

    def __init__(self, step: StepFunction, optimiser: torch.optim.Optimizer, device: torch.device,
                 graphs: bool) -> None:
        self.step, self.optimiser, self.device = step, optimiser, device
        self.side = torch.cuda.Stream(device) if graphs else None
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def __call__(self, t: torch.Tensor | None, noise: torch.Tensor | None) -> None:
        if self.graph is None and self.side is not None and self.eager_steps >= self.WARMUP:
            self._capture(t, noise)
        if self.graph is not None:
            for static, fresh in zip(self.static, (t, noise)):
                if static is not None:
                    static.copy_(fresh)
            self.graph.replay()
            return
        self.optimiser.zero_grad()
        if self.side is None:
            self.step(t, noise)
        else:
            main = torch.cuda.current_stream(self.device)  # the model's device, not the current one
            self.side.wait_stream(main)
            with torch.cuda.stream(self.side):
                self.step(t, noise)
            main.wait_stream(self.side)
        self.eager_steps += 1

    def _capture(self, t: torch.Tensor | None, noise: torch.Tensor | None) -> None:
        self.static = tuple(None if x is None else x.clone() for x in (t, noise))
        self.optimiser.zero_grad(set_to_none=True)  # capture allocates the gradients it fills
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the eager steps' cached blocks, before the graph's own pool
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(self.device), torch.cuda.graph(graph):
                self.step(*self.static)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:
            log.warning("Stage I: CUDA graph capture failed, going on with eager steps (%s)",
                        str(error).splitlines()[0])
            self.side = None
            return
        self.graph = graph


def compute_z(
    bundle: ModelBundle,
    requests: list[EditRequest],
    z_layer: dict[str, int],
    config: Stage1Config,
    image_cache: TensorCache,
    runtime: Runtime | None = None,
    resume: list[dict[str, torch.Tensor]] | None = None,
    save_progress: ProgressHook | None = None,
) -> list[ConceptTarget]:
    """Optimise every request's ``delta`` (the paper's dual self-distillation), side by side.

    Concepts are independent: each has its own delta, loss terms, noise generator, norm
    clamp and Adam state (Adam is element-wise), so batching them changes nothing but speed.
    ``resume`` continues from saved concept states; ``save_progress`` receives them every
    ``runtime.checkpoint_every`` steps. The step loop never waits for the device except there.
    """
    runtime = runtime or Runtime()
    batch = _layout(bundle, requests, z_layer, config, image_cache)
    device, count = bundle.device, len(requests)
    owner = batch.owner.to(device)
    positions = {name: p.to(device) for name, p in batch.positions.items()}
    rows_per_concept = torch.bincount(batch.owner, minlength=count).to(device)
    precision = resolve_precision(runtime.precision, device)
    graphs = runtime.cuda_graphs and device.type == "cuda"
    v_norm = {name: torch.stack([h[0].norm() for h in rows]).to(device)  # release: 1st prompt
              for name, rows in batch.hidden.items()}
    with torch.no_grad():
        teacher = bundle.encode(batch.dst_prompts)
        teacher_pooled = [p.float() for p in teacher.pooled]
    settings = resolve_settings(bundle)
    teacher_kwargs = bundle.unet_kwargs(teacher, settings["height"], settings["width"])
    source_ids = bundle.tokenize(batch.src_prompts)  # once: it costs more than a small model's step
    deltas = {name: _initial_delta(batch, name, v_norm[name], config.clamp_factor)
              for name in batch.hidden}
    starts = {name: delta.detach().clone() for name, delta in deltas.items()}
    # capturable: Adam keeps its step count on the device, so a CUDA graph can replay it.
    optimiser = torch.optim.Adam(list(deltas.values()), lr=config.lr, capturable=graphs)
    generators = [torch.Generator().manual_seed(r.seed) for r in requests]
    first = _restore(resume, deltas, optimiser, generators) if resume else 0
    # Training-time noising is DDPM's whatever the sampler (Euler's add_noise only accepts
    # timesteps of an inference schedule and skips the alpha scaling the UNet expects).
    scheduler = DDPMScheduler.from_config(bundle.scheduler.config)
    noising = None if batch.latents is None else _Noising.of(scheduler, device, batch.latents.dtype)
    loss_scale = FP16_LOSS_SCALE if precision == "fp16" else 1.0
    # What a step writes, in place: per-concept loss, first step with a non-finite loss or delta.
    step_count = torch.tensor(first, device=device)
    first_bad = torch.full((count,), -1, device=device)
    overflow = torch.full((count,), -1, device=device)
    losses = torch.zeros(count, device=device)

    def step(t: torch.Tensor | None, noise: torch.Tensor | None) -> None:
        edited = _encode_edited(bundle, source_ids, z_layer, batch.prefix, positions,
                                {name: delta[owner] for name, delta in deltas.items()})
        row_loss = torch.zeros(len(batch.src_prompts), device=device)
        if noising is not None:
            row_loss = config.noise_weight * _noise_loss(
                bundle, noising, batch.latents, noise, t, edited, teacher, teacher_kwargs,
                config.target, precision, autocast_cache=not graphs)
        if config.align_weight:
            for edited_pooled, target_pooled in zip(edited.pooled, teacher_pooled):
                align = (edited_pooled.float() - target_pooled).pow(2).mean(1)
                row_loss = row_loss + config.align_weight * align
        step_losses = torch.zeros(count, device=device).index_add_(0, owner, row_loss) / rows_per_concept
        for name, delta in deltas.items():
            step_losses = step_losses + config.norm_decay * delta.norm(dim=1) / v_norm[name] ** 2
        first_bad.copy_(torch.where((first_bad < 0) & ~torch.isfinite(step_losses), step_count, first_bad))
        (step_losses.sum() * loss_scale).backward()
        if loss_scale != 1.0:
            for delta in deltas.values():
                delta.grad.div_(loss_scale)
        optimiser.step()
        with torch.no_grad():
            losses.copy_(step_losses)
            for name, delta in deltas.items():
                limit = config.clamp_factor * v_norm[name]
                norms = delta.norm(dim=1)
                overflow.copy_(torch.where((overflow < 0) & ~torch.isfinite(norms), step_count, overflow))
                delta.mul_(torch.where(norms > limit, limit / norms, torch.ones_like(norms)).unsqueeze(1))
            step_count.add_(1)

    run_step = _Stepper(step, optimiser, device, graphs)
    draws = None
    with _unet_mode(bundle.unet, runtime.grad_checkpointing):
        for index in range(first, config.steps):
            t = noise = None
            if noising is not None:
                if (index - first) % runtime.checkpoint_every == 0:
                    draws = _draw_noise(batch, generators, scheduler.config.num_train_timesteps,
                                        min(runtime.checkpoint_every, config.steps - index))
                t, noise = (d[(index - first) % runtime.checkpoint_every] for d in draws)
            run_step(t, noise)
            done = index + 1
            if save_progress is not None and done < config.steps and done % runtime.checkpoint_every == 0:
                _check_health(requests, first_bad, overflow)
                save_progress([_concept_state(deltas, optimiser, generators[i], i, done)
                               for i in range(count)])
    _check_health(requests, first_bad, overflow, {n: d.detach() - starts[n] for n, d in deltas.items()})
    final = losses.cpu()
    return [
        ConceptTarget(request, dict(z_layer),
                      {n: d[i].detach().float().cpu() for n, d in deltas.items()},
                      {n: rows[i].cpu() for n, rows in batch.hidden.items()}, float(final[i]))
        for i, request in enumerate(requests)
    ]


def _initial_delta(batch: _Batch, name: str, v_norm: torch.Tensor, clamp_factor: float) -> torch.Tensor:
    """Zeros, or the text estimate inside the norm clamp (the invariant every step keeps)."""
    count, width = len(batch.requests), batch.hidden[name][0].shape[-1]
    if batch.text_estimate is None:
        return torch.zeros(count, width, device=v_norm.device, requires_grad=True)
    start = batch.text_estimate[name].to(v_norm.device)
    norms, limit = start.norm(dim=1), clamp_factor * v_norm
    start = start * torch.where(norms > limit, limit / norms, torch.ones_like(norms)).unsqueeze(1)
    return start.requires_grad_(True)


def _release_memory(device: torch.device) -> None:
    """Give cached blocks back after an out-of-memory error, before a smaller batch tries."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fitting_batch(bundle: ModelBundle, requests: list[EditRequest], z_layer: dict[str, int],
                  config: Stage1Config, image_cache: TensorCache, runtime: Runtime) -> int:
    """Concepts per batch that fit in the free memory of a CUDA device, measured by one probe
    step at one and at two concepts (the difference is one concept's cost); at most
    ``runtime.concept_batch`` where it is set. Elsewhere ``runtime.concept_batch``, or
    ``runtime.cpu_concept_batch`` where that is not set."""
    cuda = bundle.device.type == "cuda"
    cap = runtime.concept_batch or (len(requests) if cuda else runtime.cpu_concept_batch)
    limit = min(cap, len(requests))
    if not cuda or limit < 2:
        return limit
    device, probe = bundle.device, replace(config, steps=1)
    peaks = []
    for size in (1, 2):
        _release_memory(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        try:
            compute_z(bundle, requests[:size], z_layer, probe, image_cache, runtime)
        except torch.OutOfMemoryError:
            return 1  # the batch loop reports it if even one concept does not fit
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    per_concept = max(peaks[1] - peaks[0], 1)
    fixed = max(peaks[0] - per_concept, 0)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    fit = int((0.9 * free - fixed) // per_concept)
    log.info("Stage I: %.2f GiB per concept, %.1f GiB free: %d concepts per batch",
             per_concept / 2**30, free / 2**30, fit)
    return max(1, min(limit, fit))


def _by_progress(missing: list[int], saved: dict[int, dict]) -> list[list[int]]:
    """Concepts grouped by the step their saved progress reached (fresh ones at step 0), so
    every batch resumes from one step."""
    groups: dict[int, list[int]] = {}
    for index in missing:
        groups.setdefault(int(saved[index]["step"]) if index in saved else 0, []).append(index)
    return list(groups.values())


def compute_targets(
    bundle: ModelBundle,
    requests: list[EditRequest],
    z_layer: dict[str, int],
    config: Stage1Config,
    cache: TensorCache | None = None,
    image_cache: TensorCache | None = None,
    progress: bool = True,
    runtime: Runtime | None = None,
) -> list[ConceptTarget]:
    """Stage I for every request, each independent and cached under its full content key.

    Unfinished concepts save their progress every ``runtime.checkpoint_every`` steps and resume
    from it; a CUDA out-of-memory error halves the batch and goes on (finished concepts are
    already in the cache, and results do not depend on the batch).
    """
    from tqdm.auto import tqdm

    runtime = runtime or Runtime()
    cache = cache or TensorCache("stage1")
    image_cache = image_cache or TensorCache("images")
    progress_cache = TensorCache(f"{cache.folder.name}-progress", cache.folder.parent, cache.enabled)
    model = bundle.fingerprint()
    image_settings = resolve_settings(bundle, guidance_scale=config.image_guidance_scale,
                                      num_inference_steps=config.image_steps)
    results: dict[int, ConceptTarget] = {}
    keys = [cache_key_for(model, r, z_layer, config, image_settings, bundle.device, runtime.precision)
            for r in requests]
    saved: dict[int, dict] = {}
    for index, key in enumerate(keys):
        entry = cache.load(key)
        if entry is not None:
            results[index] = ConceptTarget.from_tensors(requests[index], z_layer, entry[0])
        elif (state := progress_cache.load(key)) is not None:
            saved[index] = state[0]
    missing = [i for i in range(len(requests)) if i not in results]
    size = fitting_batch(bundle, [requests[i] for i in missing], z_layer, config, image_cache, runtime) \
        if missing else 1
    with tqdm(total=len(missing), desc="Stage I", unit="concept", disable=not progress) as bar:
        for group in _by_progress(missing, saved):
            while group:
                chunk = group[:size]
                try:
                    targets = _run_chunk(bundle, requests, keys, chunk, z_layer, config, runtime,
                                         image_cache, progress_cache, saved)
                except torch.OutOfMemoryError:
                    if size == 1:
                        raise Stage1OutOfMemoryError(
                            "Stage I runs out of device memory even with one concept per batch: "
                            "try precision='bf16' or grad_checkpointing=True") from None
                    size //= 2
                    log.warning("Stage I out of memory; going on with %d concepts per batch", size)
                    _release_memory(bundle.device)
                    continue
                for index, target in zip(chunk, targets):
                    cache.save(keys[index], target.to_tensors(),
                               {"source": target.request.source,
                                "destination": target.request.destination})
                    progress_cache.path(keys[index]).unlink(missing_ok=True)
                    results[index] = target
                bar.update(len(chunk))
                group = group[len(chunk):]
    return [results[i] for i in range(len(requests))]


def _run_chunk(bundle: ModelBundle, requests: list[EditRequest], keys: list[str], chunk: list[int],
               z_layer: dict[str, int], config: Stage1Config, runtime: Runtime,
               image_cache: TensorCache, progress_cache: TensorCache,
               saved: dict[int, dict]) -> list[ConceptTarget]:
    """One batch of concepts, resumed from and saving to ``progress_cache``."""

    def save_progress(states: list[dict[str, torch.Tensor]]) -> None:
        for index, state in zip(chunk, states, strict=True):
            progress_cache.save(keys[index], state, {"source": requests[index].source})
            saved[index] = state

    resume = [saved[i] for i in chunk] if chunk[0] in saved else None
    return compute_z(bundle, [requests[i] for i in chunk], z_layer, config, image_cache, runtime,
                     resume, save_progress if progress_cache.enabled else None)
