"""ICEB figures per number of edits across several runs, in one table and one plot.

Each ``--run LABEL=DIR`` names a folder ``benchmarks/iceb_mini.py`` wrote (its results.json);
runs given the same label are merged, so scales measured in separate runs of one setting form
one line. Prints Source2Dest and Holdout Delta per label and scale and draws every metric
against the number of edits (emcid.bench.report's plot, one line per label):

    python benchmarks/scale_plot.py --run "release lambda=runs/base" \\
        --run "lam_edits 50=runs/rule50" --out runs/scale_plot.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def merged_scales(runs: list[tuple[str, Path]], subtask: str) -> dict[str, dict[str, dict]]:
    """{scale: {label: metrics}} from each run's only method; a scale two runs of one label
    both hold is refused (which one would be plotted is not obvious)."""
    scales: dict[str, dict[str, dict]] = {}
    for label, folder in runs:
        results = json.loads((folder / "results.json").read_text())
        for scale, methods in results["subtasks"][subtask]["scales"].items():
            if len(methods) != 1:
                raise SystemExit(f"{folder}: scale {scale} holds {len(methods)} methods; give runs of one")
            if label in scales.get(scale, {}):
                raise SystemExit(f"{label!r}: two runs hold scale {scale}")
            scales.setdefault(scale, {})[label] = next(iter(methods.values()))
    return scales


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=DIR")
    parser.add_argument("--subtask", default="aice")
    parser.add_argument("--out", required=True, help="the plot (.png)")
    args = parser.parse_args()
    runs = []
    for item in args.run:
        label, sep, folder = item.rpartition("=")
        if not sep or not label:
            raise SystemExit(f"--run {item!r}: give LABEL=DIR")
        runs.append((label, Path(folder)))
    scales = merged_scales(runs, args.subtask)
    print(f"{'setting':<36} {'edits':>6} {'S2D eff.':>9} {'Holdout D':>10}")
    for label in dict.fromkeys(label for label, _ in runs):
        for scale in sorted(scales, key=int):
            metrics = scales[scale].get(label)
            if metrics:
                print(f"{label:<36} {int(scale):>6} {metrics['source2dest_efficacy']:>+9.3f} "
                      f"{metrics['holdout_delta']:>+10.3f}")
    from emcid.bench.report import plot_metrics

    print(f"plot: {plot_metrics(args.subtask, scales, Path(args.out))}")


if __name__ == "__main__":
    main()
