"""How Stage I's steps run: CUDA graphs (:class:`Stepper`), health flags written on the device
(:class:`Health`, read by :func:`check_health` only at checkpoints and at the end), the fp16
loss scale, the state a concept resumes from (:func:`concept_state`, :func:`restore`) and
the timing of a batch's steps (:class:`StepClock`).
None of it changes the maths of :mod:`.objective`; a run with or without graphs, resumed or
not, gives the same results bit for bit.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ....errors import Stage1DivergedError
from ....requests.edit import EditRequest

log = logging.getLogger(__name__)


@contextmanager
def unet_mode(unet: torch.nn.Module, grad_checkpointing: bool) -> Iterator[None]:
    """Gradient checkpointing of the UNet for the duration of Stage I only."""
    was = getattr(unet, "is_gradient_checkpointing", False)
    if grad_checkpointing and not was:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if grad_checkpointing and not was:
            unet.disable_gradient_checkpointing()


def concept_state(deltas: dict[str, torch.Tensor], optimiser: torch.optim.Optimizer,
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


def restore(states: list[dict[str, torch.Tensor]], deltas: dict[str, torch.Tensor],
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


def check_health(requests: list[EditRequest], first_bad: torch.Tensor, overflow: torch.Tensor,
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


class Health:
    """Per concept, the first step whose loss (``first_bad``) or delta norm (``overflow``) was
    not finite (-1: none yet), written in place by each step, so no step waits for the host."""

    def __init__(self, count: int, first: int, device: torch.device) -> None:
        self.step_count = torch.tensor(first, device=device)
        self.first_bad = torch.full((count,), -1, device=device)
        self.overflow = torch.full((count,), -1, device=device)

    def note_loss(self, losses: torch.Tensor) -> None:
        self.first_bad.copy_(torch.where((self.first_bad < 0) & ~torch.isfinite(losses), self.step_count,
                                         self.first_bad))

    def note_norms(self, norms: torch.Tensor) -> None:
        self.overflow.copy_(torch.where((self.overflow < 0) & ~torch.isfinite(norms), self.step_count,
                                        self.overflow))

    def advance(self) -> None:
        self.step_count.add_(1)

    def check(self, requests: list[EditRequest], moves: dict[str, torch.Tensor] | None = None) -> None:
        check_health(requests, self.first_bad, self.overflow, moves)


def backward(loss: torch.Tensor, deltas: dict[str, torch.Tensor], loss_scale: float) -> None:
    """Gradients of the summed per-concept losses, through a loss scale (fp16) taken off again."""
    (loss.sum() * loss_scale).backward()
    if loss_scale != 1.0:
        for delta in deltas.values():
            delta.grad.div_(loss_scale)


ProgressHook = Callable[[list[dict[str, torch.Tensor]]], None]
StepFunction = Callable[[torch.Tensor | None, torch.Tensor | None], None]


def learning_rate(lr: float, schedule: str, step: int, steps: int) -> float:
    """Adam's rate at 0-based ``step`` of ``steps``: ``lr`` throughout (the release's), or a
    cosine from ``lr`` down towards 0, so the last steps settle the delta the first ones moved."""
    if schedule == "constant":
        return lr
    return 0.5 * lr * (1 + math.cos(math.pi * step / steps))


def set_rate(optimiser: torch.optim.Optimizer, value: float) -> None:
    """Set Adam's rate in place (a tensor rate, as a captured CUDA graph reads it, is filled)."""
    for group in optimiser.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


class Stepper:
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


TimingHook = Callable[[int, int, float], None]  # (concepts in the batch, steps timed, seconds)


class StepClock:
    """Times a batch's steps once, for Stage I's cost line, reading the clock only where the
    loop waits for the device anyway (a stopping check, a progress report, the end; on a CPU
    after any step): on CUDA the host runs ahead, so only there is the clock the device's
    time, and a sync of its own would stall the graph replays. The first steps (the eager
    warm-up and capture of a CUDA graph; a CPU's first-call set-up) are left out where later
    ones get measured; work still queued when the clock starts only makes the time longer.
    """

    MEASURED = 5  # steps at least, where no stopping check sets the point

    def __init__(self, hook: TimingHook | None, count: int, first: int, device: torch.device,
                 graphs: bool, at_checks: bool) -> None:
        self.hook, self.count, self.at_checks = hook, count, at_checks
        self.synchronous = device.type == "cpu"
        self.settled = first + (Stepper.WARMUP + 1 if graphs else 1)
        self.start = self.since = (first, time.perf_counter())

    def tick(self, done: int, synced: bool, checked: bool) -> None:
        """After step ``done``; ``synced``: the loop has just waited for the device there,
        ``checked``: at a stopping check."""
        if self.hook is None:
            return
        if (synced or self.synchronous) and (
                checked if self.at_checks else done - self.since[0] >= self.MEASURED):
            self._measure(done)
        elif done == self.settled:
            self.since = (done, time.perf_counter())

    def finish(self, done: int) -> None:
        """After the batch's last step and a sync: measure if no earlier point did."""
        if self.hook is not None:
            self._measure(done)

    def _measure(self, done: int) -> None:
        first, start = self.since if done > self.since[0] else self.start
        if done > first:
            self.hook(self.count, done - first, time.perf_counter() - start)
        self.hook = None
