"""The I2P report: report.html with the nudity counts before and after the edit and a small grid.

Built from the ICEB report's pieces (:mod:`emcid.bench.report`: its style and image grid), so
every benchmark's report reads the same; plain HTML, no scripts or external assets.
"""

from __future__ import annotations

import html
import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from .report import STYLE, plot_grid

LABEL_WIDTH, LABEL_LINES = 20, 3  # a prompt beside its grid row: wrapped, cut at 3 lines


def _cells(*values: object) -> str:
    return "".join(f"<td>{html.escape(str(v))}</td>" for v in values)


def figures_table(results: dict) -> str:
    """Counted detections per class, their total and the images with nudity, unedited and edited."""
    before, after = results["unedited"], results["edited"]
    lines = ["<table><tr><th>NudeNet class</th><th>unedited</th><th>edited</th></tr>"]
    for name in results["settings"]["classes"]:
        counts = before["detections"][name], after["detections"][name]
        lines.append(f"<tr><td>{html.escape(name)}</td>{_cells(*counts)}</tr>")
    lines.append(f"<tr><th>total</th>{_cells(before['total'], after['total'])}</tr>")
    lines.append("<tr><th>images with nudity</th>" + _cells(
        *(f"{f['nude_images']} of {f['images']} ({f['nude_fraction']:.3f})" for f in (before, after)))
                 + "</tr></table>")
    return "\n".join(lines)


def i2p_section(results: dict, out: Path, before: Sequence[Image.Image],
                after: Sequence[Image.Image]) -> tuple[str, dict]:
    """The I2P section of a report (its HTML and the files it wrote, relative to ``out``)."""
    settings, detector = results["settings"], results["detector"]
    parts = ["<h2>I2P: nudity before and after the edit</h2>",
             "<p>{} prompts of <code>{}</code> (category {}), one image each with the row's seed and "
             "guidance, {} DDIM steps. A detection counts when its NudeNet class is listed and its score "
             "is above {:g} (NudeNet {}, <code>{}</code> at {} px).</p>".format(
                 settings["images"], html.escape(Path(results["data"]).name),
                 html.escape(str(settings["category"] or "any")), settings["sampling_steps"],
                 settings["threshold"], html.escape(detector["nudenet"]),
                 html.escape(detector["model_file"]), detector["inference_resolution"]),
             figures_table(results)]
    written: dict = {"grids": {}}
    shown = min(settings["grid"], len(before))
    if shown:
        rows = []
        for k in range(shown):
            prompt = results["rows"][k]["prompt"]
            label = textwrap.fill(prompt, LABEL_WIDTH, max_lines=LABEL_LINES, placeholder="...")
            rows.append((label, [before[k]], [after[k]]))
        path = plot_grid(rows, out / "grids" / "i2p.png", "I2P: unedited (pre) vs edited (post)")
        written["grids"]["i2p"] = str(path.relative_to(out))
        parts.append(f"<h3>The first {shown} prompts</h3><p><img src='{written['grids']['i2p']}' "
                     "alt='I2P images, unedited and edited'></p>")
    return "\n".join(parts), written


def write_i2p_report(results: dict, out: Path, before: Sequence[Image.Image],
                     after: Sequence[Image.Image]) -> dict:
    """Write ``out/report.html`` (and its grid); returns the written paths relative to ``out``."""
    out = Path(out)
    section, written = i2p_section(results, out, before, after)
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>I2P report</title>"
            f"<style>{STYLE}</style></head><body>", "<h1>I2P nudity erasure</h1>",
            "<p>Model <code>{}</code> ({}), method <code>{}</code>, {} requests.</p>".format(
                html.escape(str(results["model"])), html.escape(str(results["family"])),
                html.escape(str(results["method"])), len(results["requests"])),
            section, "<p>" + ", ".join(f"{html.escape(k)} {html.escape(str(v))}"
                                       for k, v in results.get("versions", {}).items()) + "</p>",
            "</body></html>"]
    (out / "report.html").write_text("\n".join(page))
    return {"html": "report.html", **written}
