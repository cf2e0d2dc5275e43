"""How much room do the edited fc2 layers have, and how many captions do their statistics need?

For every edited ``fc2`` (the model's default EMCID layers) this accumulates the uncentred
second moment C = E[k k^T] of its inputs over the model's default caption corpus and prints

- the key width and the effective rank of C: the number of eigenvalues that hold 99 % of
  its trace (the directions Stage II can write into without touching what is in use);
- the convergence of C with the number of captions: the relative Frobenius distance
  ||C_n - C_N|| / ||C_N|| of the estimate after n captions to the one after all N.

Accumulation is `emcid.core.stats.running_sums` (float32 per batch into float64 totals).

    python benchmarks/key_room.py [--model M] [--captions 20000] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

import emcid
from emcid.core.stats import default_corpus, running_sums
from emcid.editors.presets import preset_options, resolve_layers


def checkpoints(total: int) -> list[int]:
    """1k, 2k, 5k, 10k, ... up to ``total`` (inclusive)."""
    out, base = [], 1000
    while base < total:
        out += [n for n in (base, 2 * base, 5 * base) if n < total]
        base *= 10
    return sorted(set(out)) + [total]


def effective_rank(matrix: torch.Tensor, share: float = 0.99) -> int:
    """How many of the largest eigenvalues hold ``share`` of the trace."""
    eig = torch.linalg.eigvalsh(matrix.double()).clamp(min=0).flip(0)
    cumulative = eig.cumsum(0) / eig.sum()
    return int((cumulative < share).sum()) + 1


def accumulate(bundle, names: list[str], captions: list[str], marks: list[int]):
    """Snapshots of C per module after each number of captions in ``marks`` (at the batch that
    reaches it)."""
    snapshots, done_before = {}, 0
    for done, sums, tokens in running_sums(bundle, bundle.slots()[0].name, names, captions):
        for mark in marks:
            if done_before < mark <= done:
                snapshots[mark] = {n: s / tokens for n, s in sums.items()}
        done_before = done
    return snapshots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model")
    parser.add_argument("--captions", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = emcid.load_model(args.model)
    slot = bundle.slots()[0]
    spec = preset_options(("emcid",), bundle, "object")["layers"][slot.name]
    layers = resolve_layers(spec, slot.num_layers)
    names = [slot.fc2_name(i) for i in layers]
    captions = default_corpus(bundle, args.captions)[: args.captions]
    marks = checkpoints(len(captions))
    t0 = time.time()
    snapshots = accumulate(bundle, names, captions, marks)
    seconds = time.time() - t0
    final = snapshots[marks[-1]]
    print(f"model {bundle.source}: {len(names)} edited fc2 layers {layers}, {len(captions)} captions, "
          f"{seconds:.0f} s ({len(captions) / seconds:.0f} captions/s, {args.threads} threads)")
    header = "block  width  eff.rank(99%)  " + "  ".join(f"err@{m}" for m in marks[:-1])
    print(header)
    total_rank = 0
    for layer, name in zip(layers, names):
        rank = effective_rank(final[name])
        total_rank += rank
        errors = [float(torch.linalg.norm(snapshots[m][name] - final[name]) / torch.linalg.norm(final[name]))
                  for m in marks[:-1]]
        print(f"{layer:5d}  {final[name].shape[0]:5d}  {rank:13d}  " + "  ".join(f"{e:.4f}" for e in errors))
    print(f"key dimensions in all: {sum(final[n].shape[0] for n in names)}, "
          f"effective rank in all: {total_rank}")


if __name__ == "__main__":
    main()
