"""Stage I's stopping rule: each concept stops once its loss stops falling, not after a fixed
count of steps (docs/method.md, "Stage I steps").

The loss is averaged over windows of ``stop_window`` steps (one step's loss depends on its
random timestep too much to compare). From ``min_steps`` on, a concept whose window mean fell
by less than ``stop_tolerance`` of the previous window's has converged: its delta and loss
at that step are its result. Each concept's trajectory is its own (:mod:`.objective`), so the
step a concept stops at, and its result, do not depend on which concepts share its batch.
A batch ends when its last concept has stopped.
"""

from __future__ import annotations

import torch

from ..config import Stage1Config


class StoppingRule:
    """Per concept, its window sums on the device and, once stopped, its result (no host
    sync except at a window's end)."""

    def __init__(self, config: Stage1Config, count: int, device: torch.device) -> None:
        self.tolerance, self.window = config.stop_tolerance, config.stop_window
        self.min_steps = config.min_steps
        self.window_sum = torch.zeros(count, device=device)
        self.previous = torch.full((count,), float("nan"))  # last window's mean, on the host
        self.stopped_at = torch.zeros(count, dtype=torch.long)  # 0: still running
        self.results: dict[int, tuple[dict[str, torch.Tensor], float]] = {}

    @property
    def enabled(self) -> bool:
        return self.tolerance > 0

    def note(self, losses: torch.Tensor) -> None:
        """Add one step's per-concept losses to the window (in place, as a CUDA graph needs)."""
        self.window_sum.add_(losses.detach())

    def is_check(self, done: int) -> bool:
        return self.enabled and done % self.window == 0

    def check(self, done: int, deltas: dict[str, torch.Tensor], losses: torch.Tensor) -> bool:
        """At the end of a window: stop the concepts that converged, keeping their result.
        Returns whether every concept has stopped."""
        means = (self.window_sum / self.window).cpu()
        self.window_sum.zero_()
        fell = self.previous - means
        converged = (fell < self.tolerance * self.previous) & (self.stopped_at == 0)
        if done >= self.min_steps:
            for index in converged.nonzero().flatten().tolist():
                self.stopped_at[index] = done
                self.results[index] = ({n: d[index].detach().clone() for n, d in deltas.items()},
                                       float(losses[index]))
        self.previous = means
        return bool((self.stopped_at > 0).all())

    def result(self, index: int, deltas: dict[str, torch.Tensor], losses: torch.Tensor
               ) -> tuple[dict[str, torch.Tensor], float]:
        """Concept ``index``'s delta and final loss: at its stop, or after the last step."""
        if index in self.results:
            return self.results[index]
        return {n: d[index].detach() for n, d in deltas.items()}, float(losses[index])

    def steps(self, index: int, ran: int) -> int:
        """The steps concept ``index``'s result took."""
        return int(self.stopped_at[index]) or ran

    def converged(self, index: int) -> bool | None:
        """Whether concept ``index`` met the rule (False: it ran every step without; None: the
        rule is off), so a run can name the concepts whose ``steps`` were too few."""
        return bool(self.stopped_at[index]) if self.enabled else None

    # -- resuming (each concept's state beside :func:`.engine.concept_state`)

    def state(self, index: int) -> dict[str, torch.Tensor]:
        state = {"stop.window_sum": self.window_sum[index].detach().cpu(),
                 "stop.previous": self.previous[index].clone(),
                 "stop.stopped_at": self.stopped_at[index].clone()}
        if index in self.results:
            kept, loss = self.results[index]
            state.update({f"stop.delta.{n}": d.cpu() for n, d in kept.items()})
            state["stop.loss"] = torch.tensor(loss)
        return state

    def restore(self, states: list[dict[str, torch.Tensor]], device: torch.device) -> None:
        if "stop.previous" not in states[0]:
            return
        self.window_sum.copy_(torch.stack([s["stop.window_sum"] for s in states]).to(device))
        self.previous = torch.stack([s["stop.previous"] for s in states])
        self.stopped_at = torch.stack([s["stop.stopped_at"] for s in states])
        for index, s in enumerate(states):
            if int(s["stop.stopped_at"]):
                kept = {k[len("stop.delta."):]: v.to(device) for k, v in s.items()
                        if k.startswith("stop.delta.")}
                self.results[index] = (kept, float(s["stop.loss"]))
