"""How many Stage I steps a concept needs: per-concept loss and delta over the release's 200
steps on the embedded model, and where the stopping rule (``stop_tolerance``) would stop.

    python benchmarks/stage1_convergence.py --destinations random --edits 24

Runs Stage I once at fixed steps (the rule off), on ICEB's first ``--edits`` AICE
requests (seed 0, nearest or random destinations), for ``--steps`` steps, recording every
step's per-concept loss (the loss the stopping rule reads) and every concept's delta each 25
steps. Prints the mean loss at steps 1/25/50/100/200, then for each tolerance the mean and
largest stopping step (a batch runs to its largest) and how far the delta at the stop lies
from the delta after all steps (||delta_stop - delta_200|| / ||delta_200||), beside the same
distance for fixed step counts. One thread; nothing is cached (``EMCID_CACHE`` holds the
source images only).
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--destinations", default="random", choices=["nearest", "random"])
    parser.add_argument("--edits", type=int, default=24)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--window", type=int, default=25, help="the rule's stop_window")
    parser.add_argument("--min-steps", type=int, default=50, help="the rule's min_steps")
    parser.add_argument("--tolerances", default="0.01,0.02,0.05,0.1,0.2")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    losses, deltas = record_run(args)
    report(losses, deltas, args)


def record_run(args) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage I at fixed steps: losses (steps, concepts) and deltas (steps / window, concepts, width)."""
    import emcid
    from emcid.bench.selection import choose_destinations, class_embeddings, split_classes
    from emcid.bench.worlds import world_for
    from emcid.cache import TensorCache
    from emcid.config import Runtime
    from emcid.editors import get_editor
    from emcid.editors.emcid.stage1 import Stage1Config, objective, stopping

    bundle = emcid.load_model(None)
    world = world_for(bundle)
    pool, holdout = split_classes(world.classes, 0, 0.5)
    edit = pool[:args.edits]
    destinations = choose_destinations(edit, holdout, class_embeddings(bundle, edit),
                                       class_embeddings(bundle, holdout), 0, 5, args.destinations)
    by_index = {c.index: c for c in world.classes}
    requests = [emcid.EditRequest(c.name, by_index[destinations[c.index]].name, world.templates, seed=0)
                for c in edit]
    layers = get_editor("emcid", bundle).layers_for(bundle)
    z_layer = {slot: max(indices) for slot, indices in layers.items()}
    steps: list[torch.Tensor] = []
    note = stopping.StoppingRule.note

    def recording(rule, loss):  # every step's per-concept loss, as the rule reads it
        steps.append(loss.detach().clone())
        note(rule, loss)

    stopping.StoppingRule.note = recording
    snapshots: list[torch.Tensor] = []
    slot = next(iter(z_layer))
    found = objective.compute_z(
        bundle, requests, z_layer, Stage1Config(steps=args.steps, stop_tolerance=0.0), TensorCache("images"),
        Runtime(checkpoint_every=args.window), None,
        lambda states: snapshots.append(torch.stack([s[f"delta.{slot}"] for s in states])))
    snapshots.append(torch.stack([t.deltas[slot] for t in found]))
    return torch.stack(steps), torch.stack(snapshots)


def stop_step(means: torch.Tensor, concept: int, tolerance: float, window: int, min_steps: int,
              steps: int) -> int:
    """Where the rule stops ``concept`` given its window means (stopping.py's rule)."""
    for w in range(1, len(means)):
        done = (w + 1) * window
        previous = means[w - 1, concept]
        if done >= min_steps and previous - means[w, concept] < tolerance * previous:
            return done
    return steps


def report(losses: torch.Tensor, deltas: torch.Tensor, args) -> None:
    steps, count = losses.shape
    final = deltas[-1]

    def distance(at: list[int]) -> torch.Tensor:
        return torch.stack([(deltas[s // args.window - 1, c] - final[c]).norm() / final[c].norm()
                            for c, s in enumerate(at)])

    marks = [s for s in (1, 25, 50, 100, 200) if s <= steps]
    print(f"{args.destinations} destinations, {count} concepts; mean loss at steps "
          + ", ".join(f"{s}: {float(losses[s - 1].mean()):.4f}" for s in marks))
    means = losses[: steps // args.window * args.window].reshape(-1, args.window, count).mean(1)
    print("| rule | mean stop | largest stop | delta distance to all steps, mean | largest |")
    print("| --- | --- | --- | --- | --- |")
    for tolerance in (float(t) for t in args.tolerances.split(",")):
        stops = [stop_step(means, c, tolerance, args.window, args.min_steps, steps) for c in range(count)]
        gap = distance(stops)
        print(f"| stop_tolerance {tolerance} | {sum(stops) / count:.0f} | {max(stops)} | "
              f"{float(gap.mean()):.3f} | {float(gap.max()):.3f} |")
    for fixed in range(2 * args.window, steps, 2 * args.window):
        gap = distance([fixed] * count)
        print(f"| fixed {fixed} | {fixed} | {fixed} | {float(gap.mean()):.3f} | {float(gap.max()):.3f} |")


if __name__ == "__main__":
    main()
