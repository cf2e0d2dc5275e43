"""ESD-x (Gandikota, Materzynska, Fiotto-Kaufman and Bau, "Erasing Concepts from Diffusion
Models", ICCV 2023): erase a concept by fine-tuning the UNet's cross-attention.

A copy ``theta'`` of the model, in which only every ``attn2.to_k`` / ``attn2.to_v`` may change
(the paper's "-x" variant, for concepts named in the prompt), is trained so that, for the
concept prompt ``c``, its noise prediction matches the frozen model's negatively guided one:

    L = || eps_theta'(x_t, c, t) - [eps_theta(x_t, t) - eta (eps_theta(x_t, c, t) - eps_theta(x_t, t))] ||^2

(mean over elements), with ``eps_theta(x_t, t)`` conditioned on the empty prompt. As in the
paper, ``x_t`` is drawn by sampling with ``theta'`` itself, conditioned on ``c`` (classifier-free
guidance ``guidance``), from noise down to a timestep chosen at random on a ``sample_steps``-step
DDIM schedule, so the erasure is trained where the edited model would go; the loss is taken at
the timestep ``x_t`` is at. A v-prediction model's outputs are turned into ``eps`` first.
Adam at ``lr``, ``steps`` iterations per concept; several concepts take turns, one iteration
each (round-robin), all into one set of weights.

ESD erases: a request's destination is never drawn. The concept prompt is the bare source
name (``request.source``, as the paper trains on it); the templates and destinations of
requests are not used, and an edit with a destination is erased only (a warning says so).

Runs are seeded (the same seed gives the same patch on one device) and resumable: progress
(weights, Adam's moments, the generator) is saved every ``checkpoint_every`` iterations in the
cache (``esd-progress``; none with ``cache=False``), so a run that was interrupted continues
from its last checkpoint with the same result as one that never stopped.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from diffusers import DDIMScheduler
from torch.func import functional_call
from tqdm.auto import tqdm

from ..core.bundle import ModelBundle, PromptEncoding
from ..core.cache import TensorCache, content_key
from ..core.config import check_float, check_int
from ..core.generation import check_seeds
from ..errors import EmcidError
from ..requests.edit import EditRequest
from .base import ConfiguredEditor
from .crossattn import cross_attention_projections

log = logging.getLogger(__name__)


@dataclass
class ESDConfig:
    """Defaults are the paper's (ESD-x) where it gives one."""

    eta: float = 1.0  # negative guidance strength (paper: 1)
    lr: float = 1e-5  # Adam's learning rate (paper: 1e-5)
    steps: int = 1000  # iterations per concept (paper: 1000)
    seed: int = 0  # draws of the timestep and the starting noise
    sample_steps: int = 50  # DDIM schedule x_t is sampled on (paper: 50)
    guidance: float = 3.0  # classifier-free guidance while sampling x_t (ESD's release: 3)

    def __post_init__(self) -> None:
        check_float("esd", "eta", self.eta, low=0)
        check_float("esd", "lr", self.lr, low=0, low_open=True)
        check_float("esd", "guidance", self.guidance, low=0)
        check_int("esd", "steps", self.steps)
        check_int("esd", "sample_steps", self.sample_steps)
        check_seeds([self.seed])


def to_epsilon(output: torch.Tensor, latents: torch.Tensor, alpha_bar: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    """The UNet's output as a noise prediction, so the loss is the paper's whatever the model predicts."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * latents
    return (latents - alpha_bar.sqrt() * output) / (1 - alpha_bar).sqrt()  # "sample": x_0


def stacked(first: PromptEncoding, second: PromptEncoding) -> PromptEncoding:
    """Two one-prompt encodings as one batch of two (one UNet call for both)."""
    added = first.added_text_embeds
    return PromptEncoding(torch.cat([first.embeds, second.embeds]),
                          [torch.cat(pair) for pair in zip(first.pooled, second.pooled)],
                          None if added is None else torch.cat([added, second.added_text_embeds]))


class Trainee:
    """``theta'`` next to the frozen ``theta`` in one UNet: a call of ``theta'`` replaces the
    cross-attention weights by ``W + delta`` for that call only (``functional_call``), so the
    model's weights are never written and the deltas are the patch."""

    def __init__(self, bundle: ModelBundle):
        self.bundle = bundle
        modules = cross_attention_projections(bundle, edit_keys=True)
        # pipeline name ("unet.<path>") -> the UNet's parameter name ("<path>.weight")
        self.parameters = {name: name.removeprefix("unet.") + ".weight" for name in modules}
        self.weights = {name: module.weight.detach() for name, module in modules.items()}
        self.deltas = {name: torch.zeros_like(w, dtype=torch.float32, requires_grad=True)
                       for name, w in self.weights.items()}
        self.alphas = bundle.scheduler.alphas_cumprod.to(bundle.device)
        self.prediction_type = bundle.scheduler.config.prediction_type

    def epsilon(self, latents: torch.Tensor, timestep: torch.Tensor, encoding: PromptEncoding,
                edited: bool) -> torch.Tensor:
        """The noise prediction of ``theta'`` (``edited``) or of the unedited model."""
        bundle = self.bundle
        kwargs = {"encoder_hidden_states": encoding.embeds,
                  **bundle.unet_kwargs(encoding, bundle.sampling["height"], bundle.sampling["width"])}
        timesteps = timestep.expand(latents.shape[0])
        if edited:
            weights = {self.parameters[n]: w + self.deltas[n].to(w.dtype) for n, w in self.weights.items()}
            output = functional_call(bundle.unet, weights, (latents, timesteps), kwargs).sample
        else:
            output = bundle.unet(latents, timesteps, **kwargs).sample
        return to_epsilon(output, latents, self.alphas[timestep], self.prediction_type)


def esd_loss(trainee: Trainee, latents: torch.Tensor, timestep: torch.Tensor,
             concept: PromptEncoding, empty: PromptEncoding, eta: float) -> torch.Tensor:
    """The paper's loss at one ``x_t``: ``theta'`` on the concept against the frozen model's
    negatively guided prediction (mean squared error)."""
    with torch.no_grad():
        unconditional, conditional = trainee.epsilon(latents.repeat(2, 1, 1, 1), timestep,
                                                     stacked(empty, concept), edited=False).chunk(2)
        target = unconditional - eta * (conditional - unconditional)
    return (trainee.epsilon(latents, timestep, concept, edited=True) - target).pow(2).mean()


@torch.no_grad()
def sample_latents(trainee: Trainee, concept: PromptEncoding, empty: PromptEncoding,
                   config: ESDConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, t)``: DDIM with ``theta'`` on the concept (guided) from noise for a random number
    of the schedule's steps. The draws come from ``generator`` on the CPU, so a run is seeded."""
    bundle = trainee.bundle
    # stepped on epsilon, which Trainee.epsilon gives whatever the UNet predicts
    scheduler = DDIMScheduler.from_config(bundle.scheduler.config, prediction_type="epsilon")
    scheduler.set_timesteps(config.sample_steps)
    done = int(torch.randint(config.sample_steps, (1,), generator=generator))
    size = [side // bundle.latent_scale() for side in (bundle.sampling["height"], bundle.sampling["width"])]
    noise = torch.randn((1, bundle.unet.config.in_channels, *size), generator=generator)
    latents = (noise * scheduler.init_noise_sigma).to(bundle.device, bundle.dtype)
    pair = stacked(empty, concept)
    for timestep in scheduler.timesteps[:done].to(bundle.device):
        unconditional, conditional = trainee.epsilon(latents.repeat(2, 1, 1, 1), timestep, pair,
                                                     edited=True).chunk(2)
        guided = unconditional + config.guidance * (conditional - unconditional)
        latents = scheduler.step(guided, timestep, latents).prev_sample
    return latents, scheduler.timesteps[done].to(bundle.device)


def progress_state(trainee: Trainee, optimiser: torch.optim.Optimizer, generator: torch.Generator,
                   step: int) -> dict[str, torch.Tensor]:
    """What resuming after ``step`` iterations needs: the deltas, Adam's moments, the generator."""
    state = {"step": torch.tensor(step), "generator": generator.get_state()}
    for name, delta in trainee.deltas.items():
        state[f"delta.{name}"] = delta.detach().cpu()
        for moment in ("exp_avg", "exp_avg_sq"):
            state[f"{moment}.{name}"] = optimiser.state[delta][moment].cpu()
    return state


def restore(state: dict[str, torch.Tensor], trainee: Trainee, optimiser: torch.optim.Optimizer,
            generator: torch.Generator) -> int:
    """Load a saved :func:`progress_state`; returns the iterations it had done."""
    step = int(state["step"])
    with torch.no_grad():
        for name, delta in trainee.deltas.items():
            delta.copy_(state[f"delta.{name}"])
            moments = {m: state[f"{m}.{name}"].to(delta) for m in ("exp_avg", "exp_avg_sq")}
            optimiser.state[delta] = {"step": torch.tensor(float(step)), **moments}
    generator.set_state(state["generator"])
    return step


def train(trainee: Trainee, concepts: list[str], config: ESDConfig, progress_cache: TensorCache,
          key: str, every: int, progress: bool) -> None:
    """``config.steps`` iterations per concept, taking turns, into ``trainee.deltas``; progress
    saved under ``key`` every ``every`` iterations and removed once the run is done."""
    bundle = trainee.bundle
    with torch.no_grad():
        empty = bundle.encode([""])
        encodings = [bundle.encode([concept]) for concept in concepts]
    optimiser = torch.optim.Adam(list(trainee.deltas.values()), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    saved = progress_cache.load(key)
    first = restore(saved[0], trainee, optimiser, generator) if saved else 0
    total = config.steps * len(concepts)
    with tqdm(total=total, initial=first, desc="ESD", unit="step", disable=not progress) as bar:
        for step in range(first, total):
            concept = encodings[step % len(concepts)]
            latents, timestep = sample_latents(trainee, concept, empty, config, generator)
            loss = esd_loss(trainee, latents, timestep, concept, empty, config.eta)
            if not torch.isfinite(loss):
                raise EmcidError(f"esd diverged at iteration {step}: the loss is not finite; "
                                 "lower the learning rate (lr)")
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
            bar.update()
            if (step + 1) % every == 0 and step + 1 < total:
                progress_cache.save(key, progress_state(trainee, optimiser, generator, step + 1),
                                    {"concepts": ", ".join(concepts)})
    progress_cache.path(key).unlink(missing_ok=True)


class ESDEditor(ConfiguredEditor):
    """ESD-x: erases every request's source; a destination is not drawn (module docstring)."""

    name = "esd"
    config_class = ESDConfig
    runtime_options = frozenset({"cache", "cache_root", "checkpoint_every"})

    def prepare(self, requests: list[EditRequest], bundle: ModelBundle) -> list[EditRequest]:
        edits = [f"{r.source!r} -> {r.destination!r}" for r in requests if not r.is_erase]
        if edits:
            log.warning("esd only erases sources; these requests' destinations are not drawn: %s",
                        ", ".join(edits))
        return requests

    def compute(self, bundle: ModelBundle, requests: list[EditRequest], progress: bool) -> dict:
        concepts = list(dict.fromkeys(r.source for r in requests))
        key = content_key(model=bundle.fingerprint(), concepts=concepts, hparams=asdict(self.config),
                          device=bundle.device.type, dtype=str(bundle.dtype))
        trainee = Trainee(bundle)
        train(trainee, concepts, self.config, self.cache("esd-progress"), key,
              self.runtime.checkpoint_every, progress)
        return {name: delta.detach().float().cpu() for name, delta in trainee.deltas.items()}
