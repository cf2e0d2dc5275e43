"""Stage I's objective: per-concept target values by dual self-distillation (docs/method.md).

For one request, a vector ``delta`` per edited text encoder is added to the output of its
last edited block ``l*`` at the subject token of every source prompt. ``delta`` is optimised
so that the edited encoder on the source prompts makes (1) the UNet predict what the
unedited model predicts on the destination prompts, on the same noisy latents of source
images, and (2) the pooled text output match the unedited encoder's on the destination.
No weight changes here; the result is the target ``z = h + delta`` at ``l*`` per prompt.

This module holds the maths: the rows a batch of concepts is laid out in, the loss terms
(:class:`Objective`) and :func:`compute_z`, the optimisation. How prompts are tokenised for
the UNet is :mod:`.conditioning`, which image latents are noised :mod:`.latents` (each the
pipeline's way or the release's); how steps run (CUDA graphs, health flags, resume) is
:mod:`.engine`; which concepts run when is :mod:`.schedule`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from ....core.bundle import ModelBundle, PromptEncoding
from ....core.cache import TensorCache
from ....core.config import Runtime
from ....core.generation import resolve_settings
from ....core.hooks import add_at_positions, gather_positions, replay_prefix
from ....core.tokens import subject_positions
from ....errors import OptionError
from ....requests.edit import EditRequest
from ..config import FP16_LOSS_SCALE, Stage1Config, resolve_precision
from ..targets import ConceptTarget
from . import engine
from .conditioning import TextRows, prompt_tokens
from .latents import Noising, image_sides, sampled, side_latents, step_draws
from .start import initial_deltas, record_block_outputs
from .stopping import StoppingRule


@dataclass
class Batch:
    """Several concepts' rows laid out as one tensor program (one row per image)."""

    requests: list[EditRequest]
    owner: torch.Tensor  # concept index of each row
    src_prompts: list[str]
    dst_prompts: list[str]
    latents: torch.Tensor | None  # None when the noise-prediction loss is off
    text: TextRows  # the text pass's rows: each concept's prompts once, with block l*'s output
    keys: torch.Tensor | None  # per row, the tokens the UNet may attend to (None: all)
    hidden: dict[str, list[torch.Tensor]]  # per concept: unedited h at l*, (n_prompts, width)
    spread: torch.Tensor | None = None  # the posterior's std where latents are drawn from it


def _image_latents(bundle: ModelBundle, requests: list[EditRequest], config: Stage1Config,
                   image_cache: TensorCache, generators: list[torch.Generator]
                   ) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]] | None]:
    """Per request, the latents of each side's images (``distil_on``), and their spreads where
    latents are drawn from the posterior; ``[]`` when the noise prediction loss is off."""
    sides = [side_latents(bundle, requests, config, image_cache, generators, side)
             for side in image_sides(config)]
    if not sides:
        return [], None
    latents = [[means[index] for means, _ in sides] for index in range(len(requests))]
    if sides[0][1] is None:
        return latents, None
    return latents, [[spread[index] for _, spread in sides] for index in range(len(requests))]


def _text_rows(bundle: ModelBundle, requests: list[EditRequest], z_layer: dict[str, int],
               conditioning: str, expand: torch.Tensor | None) -> tuple[TextRows, torch.Tensor | None]:
    """Each concept's source prompts once, tokenised for ``conditioning``, with block l*'s
    unedited output recorded on them (what the steps replay); and the UNet's key mask for
    every batch row (``expand``: each row's text row, None where they are the same rows)."""
    owner = torch.tensor([index for index, request in enumerate(requests) for _ in request.prompts])
    prompts = [prompt for request in requests for prompt in request.source_prompts()]
    # Tokenised once: it costs more than a small model's step.
    tokens = prompt_tokens(bundle, conditioning, prompts, owner)
    prefix = record_block_outputs(bundle, z_layer, lambda: tokens.encode(bundle))
    positions = {name: torch.cat([subject_positions(bundle.slot(name).tokenizer, r.prompts, r.source)
                                  for r in requests]).to(bundle.device) for name in z_layer}
    device = bundle.device
    if expand is not None:
        expand = expand.to(device)
    keys = tokens.keys if tokens.keys is None or expand is None else tokens.keys.index_select(0, expand)
    return TextRows(tokens.ids, tokens.masks, prefix, positions, owner.to(device), expand), keys


def layout(bundle: ModelBundle, requests: list[EditRequest], z_layer: dict[str, int],
            config: Stage1Config, image_cache: TensorCache,
            generators: list[torch.Generator] | None = None) -> Batch:
    """Rows of every concept, with the unedited states of block l* read in one pass.

    A concept's rows are its images, side by side (``distil_on``: the source's, the
    destination's, or the source's then the destination's), each side's cycling through the
    prompts; text-only targets have one row per prompt. The text pass runs on each prompt
    once (a row's edited encoding does not depend on its image), so block l*'s output is
    recorded on those rows alone.
    ``generators``: each concept's, for the release's flips (None: fresh from its seed).
    """
    generators = generators or [torch.Generator().manual_seed(r.seed) for r in requests]
    latents, spreads = _image_latents(bundle, requests, config, image_cache, generators)
    owner, src, dst, text_row = [], [], [], []
    prompts_before = 0  # the text rows of the concepts before this one
    for index, request in enumerate(requests):
        count = len(request.prompts)
        sizes = [side.shape[0] for side in latents[index]] if latents else [count]
        rows = torch.cat([torch.arange(size) % count for size in sizes])
        text_row.append(rows + prompts_before)
        prompts_before += count
        owner += [index] * len(rows)
        src += [request.source_prompts()[i] for i in rows]
        dst += [request.destination_prompts()[i] for i in rows]
    expand = torch.cat(text_row) if len(owner) != prompts_before else None
    text, keys = _text_rows(bundle, requests, z_layer, config.conditioning, expand)
    hidden = {}
    for name, states in text.prefix.items():
        at_subject = gather_positions(states, text.positions[name])
        hidden[name] = list(at_subject.split([len(r.prompts) for r in requests]))
    return Batch(requests, torch.tensor(owner), src, dst,
                 torch.cat([x for sides in latents for x in sides]) if latents else None,
                 text, keys, hidden,
                 torch.cat([x for sides in spreads for x in sides]) if spreads else None)


def draw_noise(batch: Batch, generators: list[torch.Generator], train_steps: int,
                count: int, low: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps (count, rows) and noise (count, rows, ...; with drawn latents the posterior's
    draw beside it, :func:`.latents.step_draws`) for the next ``count`` steps, each concept from
    its own generator in step order (so independent of batch and of ``count``), moved to the
    device in one copy rather than once per step."""
    shape = batch.latents.shape[1:]
    timesteps, noise = [], []
    for index, generator in enumerate(generators):
        rows = int((batch.owner == index).sum())
        draws = [(torch.randint(low, train_steps, (rows,), generator=generator),
                  step_draws(rows, shape, generator, batch.spread is not None)) for _ in range(count)]
        timesteps.append(torch.stack([t for t, _ in draws]))
        noise.append(torch.stack([n for _, n in draws]))
    device = batch.latents.device
    return torch.cat(timesteps, 1).to(device), torch.cat(noise, 1).to(device, batch.latents.dtype)


def encode_edited(bundle: ModelBundle, ids: list[torch.Tensor], z_layer: dict[str, int],
                   prefix: dict[str, torch.Tensor], positions: dict[str, torch.Tensor],
                   vectors: dict[str, torch.Tensor],
                   masks: list[torch.Tensor] | None = None) -> PromptEncoding:
    """Stage I's text pass: ``ids`` encoded (with the attention ``masks``, where given) with
    block l*'s recorded output replayed (nothing before it depends on delta) and ``vectors``
    added there at each row's subject token."""
    with ExitStack() as stack:
        for name, layer in z_layer.items():
            slot = bundle.slot(name)
            stack.enter_context(replay_prefix([slot.block(i) for i in range(layer + 1)], prefix[name]))
            stack.enter_context(add_at_positions(slot.block(layer), positions[name], vectors[name]))
        return bundle.encode_ids(ids, masks)


def _edited_unet_kwargs(teacher_kwargs: dict, edited: PromptEncoding) -> dict:
    """The teacher's extra UNet inputs with the edited pooled text embedding (SDXL). The size
    conditioning is made once, before the steps: a copy from the host cannot be in a CUDA graph."""
    if "added_cond_kwargs" not in teacher_kwargs:
        return teacher_kwargs
    return {"added_cond_kwargs": {**teacher_kwargs["added_cond_kwargs"],
                                  "text_embeds": edited.added_text_embeds}}


def noise_loss(bundle: ModelBundle, noising: Noising, latents: torch.Tensor, noise: torch.Tensor,
                t: torch.Tensor, edited: PromptEncoding, teacher: PromptEncoding,
                teacher_kwargs: dict, target: str, precision: str,
                autocast_cache: bool = True,
                keys: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)) -> torch.Tensor:
    """Per-row MSE between the UNet's prediction under the edited conditioning and the
    unedited model's prediction under the destination's (or the true noise / velocity).

    The UNet runs under autocast at ``precision`` (its cache of cast weights off where a CUDA
    graph is captured, as capture requires); the loss is float32. ``keys``: the tokens the
    UNet may attend to under the edited and the teacher's conditioning (None: all).
    """
    signal, sigma = noising.scales(t)
    noisy = signal * latents + sigma * noise
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast(bundle.device.type, dtype=dtype, enabled=dtype is not None,
                        cache_enabled=autocast_cache):
        prediction = bundle.unet(noisy, t, encoder_hidden_states=edited.embeds,
                                 encoder_attention_mask=keys[0],
                                 **_edited_unet_kwargs(teacher_kwargs, edited)).sample
        with torch.no_grad():  # the teacher: once per (concept, timestep draw), no graph
            if target == "noise":
                goal = signal * noise - sigma * latents if noising.velocity else noise
            else:
                goal = bundle.unet(noisy, t, encoder_hidden_states=teacher.embeds,
                                   encoder_attention_mask=keys[1], **teacher_kwargs).sample
    return (prediction.float() - goal.float()).pow(2).flatten(1).mean(1)


@dataclass
class Objective:
    """Stage I's loss for a batch of concepts, term by term; everything fixed before the steps
    (the teacher's encoding and key mask, the noising tables) is made once here."""

    bundle: ModelBundle
    batch: Batch
    config: Stage1Config
    z_layer: dict[str, int]
    owner: torch.Tensor  # concept of each row, on the device
    text: TextRows  # the text pass's rows: each concept's prompts once
    rows_per_concept: torch.Tensor
    v_norm: dict[str, torch.Tensor]  # per concept: ||h|| at the subject of its first prompt
    teacher: PromptEncoding
    keys: tuple[torch.Tensor | None, torch.Tensor | None]  # the UNet's key masks: edited, teacher
    teacher_pooled: list[torch.Tensor]
    teacher_kwargs: dict
    noising: Noising | None
    train_steps: int  # DDPM's, for the timesteps drawn
    precision: str
    autocast_cache: bool

    @classmethod
    def of(cls, bundle: ModelBundle, batch: Batch, z_layer: dict[str, int], config: Stage1Config,
           precision: str, graphs: bool) -> Objective:
        device = bundle.device
        v_norm = {name: torch.stack([h[0].norm() for h in rows]).to(device)  # release: 1st prompt
                  for name, rows in batch.hidden.items()}
        destination = prompt_tokens(bundle, config.conditioning, batch.dst_prompts, batch.owner)
        with torch.no_grad():
            teacher = destination.encode(bundle)
            teacher_pooled = [p.float() for p in teacher.pooled]
        settings = resolve_settings(bundle)
        teacher_kwargs = bundle.unet_kwargs(teacher, settings["height"], settings["width"])
        # Training-time noising is DDPM's whatever the sampler (Euler's add_noise only accepts
        # timesteps of an inference schedule and skips the alpha scaling the UNet expects).
        scheduler = DDPMScheduler.from_config(bundle.scheduler.config)
        noising = None if batch.latents is None else Noising.of(scheduler, device, batch.latents.dtype)
        return cls(bundle, batch, config, z_layer, batch.owner.to(device),
                   batch.text,
                   torch.bincount(batch.owner, minlength=len(batch.requests)).to(device), v_norm,
                   teacher, (batch.keys, destination.keys), teacher_pooled, teacher_kwargs,
                   noising, scheduler.config.num_train_timesteps, precision, autocast_cache=not graphs)

    def edited(self, deltas: dict[str, torch.Tensor]) -> PromptEncoding:
        """The source prompts encoded with each concept's delta added at its subject tokens (each
        prompt once: a row's encoding does not depend on its image)."""
        text = self.text
        return text.spread(encode_edited(self.bundle, text.ids, self.z_layer, text.prefix, text.positions,
                                         {name: delta[text.owner] for name, delta in deltas.items()},
                                         text.masks))

    def noise_term(self, edited: PromptEncoding, t: torch.Tensor | None,
                   noise: torch.Tensor | None) -> torch.Tensor:
        """Per row: the UNet's noise prediction against the teacher's (zeros when it is off)."""
        if self.noising is None:
            return torch.zeros(len(self.batch.src_prompts), device=self.bundle.device)
        latents, noise = sampled(self.batch.latents, self.batch.spread, noise)
        return self.config.noise_weight * noise_loss(
            self.bundle, self.noising, latents, noise, t, edited, self.teacher,
            self.teacher_kwargs, self.config.target, self.precision, self.autocast_cache, self.keys)

    def align_terms(self, edited: PromptEncoding) -> Iterator[torch.Tensor]:
        """Per row and text encoder: the pooled output against the teacher's on the destination."""
        if self.config.align_weight:
            for edited_pooled, target_pooled in zip(edited.pooled, self.teacher_pooled):
                yield self.config.align_weight * (edited_pooled.float() - target_pooled).pow(2).mean(1)

    def per_concept(self, rows: torch.Tensor) -> torch.Tensor:
        """Row losses averaged over each concept's rows."""
        total = torch.zeros(len(self.batch.requests), device=self.bundle.device)
        return total.index_add_(0, self.owner, rows) / self.rows_per_concept

    def decay_terms(self, deltas: dict[str, torch.Tensor]) -> Iterator[torch.Tensor]:
        """Per concept and text encoder: release's norm decay, ``||delta|| / ||v_src||^2``."""
        for name, delta in deltas.items():
            yield self.config.norm_decay * delta.norm(dim=1) / self.v_norm[name] ** 2

    def limits(self) -> dict[str, torch.Tensor]:
        """Per concept and text encoder, the largest ``||delta||``: release's clamp."""
        return {name: self.config.clamp_factor * norm for name, norm in self.v_norm.items()}


def check_timesteps(bundle: ModelBundle, config: Stage1Config) -> None:
    """Refuse a ``min_timestep`` the model's scheduler never trains on, before any work."""
    train_steps = bundle.scheduler.config.num_train_timesteps
    if config.noise_weight > 0 and config.min_timestep >= train_steps:
        raise OptionError(f"Stage I option min_timestep={config.min_timestep}: the model's scheduler "
                          f"trains on timesteps 0 to {train_steps - 1}")


def compute_z(
    bundle: ModelBundle,
    requests: list[EditRequest],
    z_layer: dict[str, int],
    config: Stage1Config,
    image_cache: TensorCache,
    runtime: Runtime | None = None,
    resume: list[dict[str, torch.Tensor]] | None = None,
    save_progress: engine.ProgressHook | None = None,
    report: Callable[[int, float], None] | None = None,
    timed: engine.TimingHook | None = None,
) -> list[ConceptTarget]:
    """Optimise every request's ``delta`` (the paper's dual self-distillation), side by side.

    Concepts are independent: each has its own delta, loss terms, noise generator, norm
    clamp and Adam state (Adam is element-wise), so batching them changes nothing but speed.
    ``resume`` continues from saved concept states; ``save_progress`` receives them every
    ``runtime.checkpoint_every`` steps, and ``report`` the concept-steps done since its last
    call and the mean loss, as often; ``timed`` the seconds of some steps, once
    (:class:`.engine.StepClock`). The step loop never waits for the device except there.
    """
    runtime = runtime or Runtime()
    generators = [torch.Generator().manual_seed(r.seed) for r in requests]
    batch = layout(bundle, requests, z_layer, config, image_cache, generators)
    device, count = bundle.device, len(requests)
    precision = resolve_precision(runtime.precision, device)
    graphs = runtime.cuda_graphs and device.type == "cuda"
    objective = Objective.of(bundle, batch, z_layer, config, precision, graphs)
    limits = objective.limits()
    deltas = initial_deltas(bundle, requests, z_layer, batch.hidden, config.init, limits)
    starts = {name: delta.detach().clone() for name, delta in deltas.items()}
    # capturable: Adam keeps its step count on the device, so a CUDA graph can replay it.
    # A scheduled rate (set before every step below) is a tensor under CUDA graphs, so that
    # each replay reads the new value.
    scheduled = config.lr_schedule != "constant"
    rate = torch.tensor(config.lr, device=device) if graphs and scheduled else config.lr
    optimiser = torch.optim.Adam(list(deltas.values()), lr=rate, capturable=graphs)
    first = engine.restore(resume, deltas, optimiser, generators) if resume else 0
    loss_scale = FP16_LOSS_SCALE if precision == "fp16" else 1.0
    health, losses = engine.Health(count, first, device), torch.zeros(count, device=device)
    stopping = StoppingRule(config, count, device)
    if resume:
        stopping.restore(resume, device)

    def step(t: torch.Tensor | None, noise: torch.Tensor | None) -> None:
        edited = objective.edited(deltas)
        # The terms are generators, so each is made as it is added, in this order (the order
        # autograd sums their gradients in, and so part of the results).
        rows = sum(objective.align_terms(edited), objective.noise_term(edited, t, noise))  # per row
        loss = sum(objective.decay_terms(deltas), objective.per_concept(rows))  # per concept
        health.note_loss(loss)
        engine.backward(loss, deltas, loss_scale)
        optimiser.step()
        with torch.no_grad():
            losses.copy_(loss)
            stopping.note(loss)
            for name, delta in deltas.items():  # release: ||delta|| <= clamp_factor ||v_src||
                norms = delta.norm(dim=1)
                health.note_norms(norms)
                delta.mul_(torch.where(norms > limits[name], limits[name] / norms,
                                       torch.ones_like(norms)).unsqueeze(1))
            health.advance()

    run_step, every = engine.Stepper(step, optimiser, device, graphs), runtime.checkpoint_every
    draws, reported, done = None, first, first
    clock = engine.StepClock(timed, count, first, device, graphs, stopping.enabled)
    with engine.unet_mode(bundle.unet, runtime.grad_checkpointing):
        for index in range(first, config.steps):
            t = noise = None
            if objective.noising is not None:
                if (index - first) % every == 0:  # the next draws, up to the next checkpoint
                    draws = draw_noise(batch, generators, objective.train_steps,
                                       min(every, config.steps - index), config.min_timestep)
                t, noise = (d[(index - first) % every] for d in draws)
            if scheduled:
                engine.set_rate(optimiser, engine.learning_rate(config.lr, config.lr_schedule, index,
                                                                config.steps))
            run_step(t, noise)
            done = index + 1
            checked = stopping.is_check(done)
            finished = checked and stopping.check(done, deltas, losses)
            reporting = report is not None and (done % every == 0 or done == config.steps or finished)
            if reporting:
                # an early end counts the steps it saved as done, so the bar ends full
                report(count * ((config.steps if finished else done) - reported), float(losses.mean()))
                reported = done
            clock.tick(done, checked or reporting, checked)
            if finished:
                break
            if save_progress is not None and done < config.steps and done % every == 0:
                health.check(requests)
                save_progress([{**engine.concept_state(deltas, optimiser, generators[i], i, done),
                                **stopping.state(i)} for i in range(count)])
    health.check(requests, {name: delta.detach() - starts[name] for name, delta in deltas.items()})
    clock.finish(done)
    results = [stopping.result(i, deltas, losses) for i in range(count)]
    return [
        ConceptTarget(request, dict(z_layer), {n: d.float().cpu() for n, d in kept.items()},
                      {n: rows[i].cpu() for n, rows in batch.hidden.items()}, loss,
                      stopping.steps(i, done), stopping.converged(i))
        for i, (request, (kept, loss)) in enumerate(zip(requests, results, strict=True))
    ]
