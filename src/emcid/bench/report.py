"""The ICEB report: one self-contained folder with report.html, PNG plots and image grids.

The HTML is plain (no scripts, no external assets) so it opens anywhere and can be
archived next to results.json; figures are drawn with matplotlib's non-interactive backend.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

METRIC_LABELS = {
    "source_forget_efficacy": "Source Forget (efficacy)",
    "source2dest_efficacy": "Source2Dest (efficacy)",
    "source_forget_generalization": "Source Forget (generalization)",
    "source2dest_generalization": "Source2Dest (generalization)",
    "alias2dest": "Alias2Dest",
    "holdout_delta": "Holdout Delta",
}
SUBTASK_TITLES = {"aice": "AICE: arbitrary ImageNet concept editing",
                  "rectification": "Concept rectification"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _series(scales: dict, method: str, metric: str) -> tuple[list[int], list[float]]:
    points = sorted((int(s), m[method][metric]) for s, m in scales.items()
                    if method in m and m[method].get(metric) is not None)
    return [p[0] for p in points], [p[1] for p in points]


def plot_metrics(subtask: str, scales: dict, path: Path) -> Path:
    """One panel per metric, value against number of edits, one line per method."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    methods = sorted({m for entry in scales.values() for m in entry})
    ticks = sorted(int(s) for s in scales)
    figure, axes = plt.subplots(2, 3, figsize=(12, 6.5), squeeze=False)
    for ax, (metric, label) in zip(axes.flat, METRIC_LABELS.items()):
        for method in methods:
            xs, ys = _series(scales, method, metric)
            if xs:
                ax.plot(xs, ys, marker="o", label=method)
        ax.set_title(label, fontsize=10)
        ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("number of edits")
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    figure.suptitle(SUBTASK_TITLES.get(subtask, subtask))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def plot_grid(rows: Sequence[tuple], path: Path, title: str) -> Path:
    """Each row: pre-edit images, post-edit images of the same prompts and seeds, then optional
    reference images (the unedited model drawing the destination)."""
    plt = _pyplot()
    rows = [tuple(r) + ([],) * (4 - len(r)) for r in rows]
    width = max(len(pre) + len(post) + len(ref) for _, pre, post, ref in rows)
    figure, axes = plt.subplots(len(rows), width, figsize=(1.6 * width, 1.8 * len(rows) + 0.4),
                                squeeze=False)
    for r, (label, pre, post, ref) in enumerate(rows):
        images = list(pre) + list(post) + list(ref)
        titles = ["pre"] * len(pre) + ["post"] * len(post) + ["destination"] * len(ref)
        for c in range(width):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                image = images[c]
                ax.imshow(image.numpy() if isinstance(image, torch.Tensor) else image)
                ax.set_title(titles[c], fontsize=7)
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _format(value: float | None) -> str:
    return "&ndash;" if value is None else f"{value:+.3f}"


def _table(scales: dict) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for label in METRIC_LABELS.values())
    lines = [f"<table><tr><th>edits</th><th>method</th>{head}<th>edit s</th><th>post images s</th></tr>"]
    for scale in sorted(scales, key=int):
        for method, entry in sorted(scales[scale].items()):
            cells = "".join(f"<td>{_format(entry.get(m))}</td>" for m in METRIC_LABELS)
            timings = entry.get("timings", {})
            lines.append(
                f"<tr><td>{scale}</td><td>{html.escape(method)}</td>{cells}"
                f"<td>{timings.get('edit_s', 0):.1f}</td><td>{timings.get('post_images_s', 0):.1f}</td></tr>")
    lines.append("</table>")
    return "\n".join(lines)


SCORE_LABELS = {"pre_source_efficacy": "pre P(src)", "post_source_efficacy": "post P(src)",
                "pre_destination_efficacy": "pre P(dst)", "post_destination_efficacy": "post P(dst)",
                "pre_holdout": "pre P(own), holdout", "post_holdout": "post P(own), holdout"}


def _scores_table(scales: dict) -> str:
    """Absolute mean probabilities behind the differences (editing-template images)."""
    head = "".join(f"<th>{html.escape(label)}</th>" for label in SCORE_LABELS.values())
    lines = [f"<table><tr><th>edits</th><th>method</th>{head}</tr>"]
    for scale in sorted(scales, key=int):
        for method, entry in sorted(scales[scale].items()):
            scores = entry.get("scores", {})
            cells = "".join("<td>{}</td>".format("&ndash;" if scores.get(k) is None else f"{scores[k]:.3f}")
                            for k in SCORE_LABELS)
            lines.append(f"<tr><td>{scale}</td><td>{html.escape(method)}</td>{cells}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f0f0f0}img{max-width:100%}code{background:#f4f4f4;padding:0 3px}"""


def write_report(results: dict, out: Path, grids: dict | None = None) -> dict:
    """Write plots, grids and report.html under ``out``; returns their paths relative to it."""
    out = Path(out)
    written: dict = {"html": "report.html", "plots": {}, "grids": {}}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>ICEB report</title>"
             f"<style>{STYLE}</style></head><body>",
             "<h1>ICEB: ImageNet Concept Editing Benchmark</h1>",
             "<p>Model <code>{}</code> ({}), world <code>{}</code>, judge <code>{}</code>, method "
             "<code>{}</code>, seed {}.</p>".format(
                 html.escape(str(results.get("model"))), html.escape(str(results.get("family"))),
                 html.escape(str(results.get("world"))), html.escape(str(results.get("judge"))),
                 html.escape(str(results.get("method"))), results.get("settings", {}).get("seed")),
             "<p>All metrics are differences of mean judge probabilities between the edited and the "
             "unedited model on the same prompts and seeds (docs/method.md section 6); higher is better "
             "except for Holdout Delta, which should stay near 0.</p>"]
    for subtask, data in results.get("subtasks", {}).items():
        scales = data.get("scales", {})
        parts.append(f"<h2>{html.escape(SUBTASK_TITLES.get(subtask, subtask))}</h2>")
        found = data.get("badly_drawn_aliases")
        parts.append(f"<p>{len(data.get('edits', []))} edits at the largest scale"
                     + (f" (of {found} badly drawn aliases found)" if found is not None else "")
                     + f", {len(data.get('holdout_scored', []))} holdout classes scored.</p>")
        if not scales:
            parts.append("<p>Nothing to edit for this subtask.</p>")
            continue
        parts.append(_table(scales))
        parts.append("<p>Absolute scores (editing-template images):</p>" + _scores_table(scales))
        plot = plot_metrics(subtask, scales, out / "plots" / f"{subtask}.png")
        written["plots"][subtask] = str(plot.relative_to(out))
        parts.append(f"<p><img src='{written['plots'][subtask]}' alt='{subtask} metrics'></p>")
        grid = (grids or {}).get(subtask, {})
        for part, caption in (("edits", "sample edits"), ("holdout", "sample holdout classes")):
            rows = grid.get(part) or []
            if not rows:
                continue
            title = f"{subtask}: {caption}, pre vs. post at {grid.get('scale')} edits"
            path = plot_grid(rows, out / "grids" / f"{subtask}_{part}.png", title)
            written["grids"][f"{subtask}_{part}"] = str(path.relative_to(out))
            parts.append(f"<h3>{html.escape(caption.capitalize())} ({grid.get('scale')} edits)</h3>"
                         f"<p><img src='{path.relative_to(out)}' alt='{html.escape(title)}'></p>")
    timings = results.get("timings", {})
    parts.append("<h2>Timings and versions</h2><p>" + ", ".join(
        f"{html.escape(k)}: {v:.1f} s" for k, v in timings.items()) + "</p>")
    parts.append("<p>" + ", ".join(f"{html.escape(k)} {html.escape(str(v))}"
                                   for k, v in results.get("versions", {}).items()) + "</p>")
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts))
    log.info("report written to %s", out / "report.html")
    return written


def summary_table(results: dict, method: str | None = None) -> str:
    """A plain-text table of every subtask, scale and metric, for terminals and logs."""
    short = {"source_forget_efficacy": "forget", "source2dest_efficacy": "s2d",
             "source_forget_generalization": "forget-gen", "source2dest_generalization": "s2d-gen",
             "alias2dest": "alias2dest", "holdout_delta": "holdout"}
    lines = []
    for subtask, data in results.get("subtasks", {}).items():
        lines.append(f"{subtask}: up to {len(data.get('edits', []))} edits")
        lines.append("  " + f"{'edits':>6} {'method':<10}" + "".join(f"{v:>11}" for v in short.values()))
        for scale in sorted(data.get("scales", {}), key=int):
            for name, entry in sorted(data["scales"][scale].items()):
                if method is not None and name != method:
                    continue
                cells = "".join(f"{'-' if entry.get(m) is None else format(entry[m], '+.3f'):>11}"
                                for m in short)
                lines.append("  " + f"{scale:>6} {name:<10}" + cells)
    return "\n".join(lines)
