"""Single-edit benchmarks in the TIMED and RoAD layouts: rows, their CSV loaders, the metrics.

TIMED (Orgad et al., 2023) and RoAD (Arad et al., 2024) give one edit per row, with positive
prompts (the edit should show there too: generality) and negative prompts (related concepts
that must not change: specificity). Every prompt is a :class:`Probe`: the prompt drawn and
the two texts a judge chooses between on its images (what it shows unedited, and what it
shows edited). The run is in :mod:`emcid.bench.timed_run`; rows built from the embedded world
in :mod:`emcid.bench.timed_world` (docs/timed.md).

Column layouts (header names are read case-insensitively; other columns are ignored):

- TIMED: ``old, new``, then ``positive<k>, gt<k>`` and ``negative<k>, gn<k>`` for k = 1..K;
- RoAD: ``prompt, old, new``, then ``positive<k>, positive_old<k>, positive_new<k>`` and
  ``negative<k>, negative_new<k>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..concepts import OBJECT_PROMPTS
from ..core.config import check_float
from ..errors import BenchmarkError, RequestError
from ..requests.edit import EditRequest
from .csvfile import read_rows

ARTICLES = ("a", "an", "the")
#: ReFACT's extra generality figures: the share of positive images above these P(destination).
DEFAULT_THRESHOLDS = (0.75, 0.9)


@dataclass(frozen=True)
class Probe:
    """A prompt to draw, and the two texts the judge chooses between on its images."""

    prompt: str
    source: str  # what the unedited model should show
    destination: str  # what the edited model should show


@dataclass(frozen=True)
class TimedRow:
    """One edit and the probes that measure it; ``line`` is its line in the file (or its
    number, for rows built from the world)."""

    line: int
    request: EditRequest
    efficacy: tuple[Probe, ...]
    positives: tuple[Probe, ...]
    negatives: tuple[Probe, ...]

    def probes(self) -> list[Probe]:
        """Every probe, in the order their images are drawn and their figures read."""
        return [*self.efficacy, *self.positives, *self.negatives]


@dataclass(frozen=True)
class Layout:
    """A CSV layout: its fixed columns and the patterns of its numbered probe columns."""

    name: str
    command: str  # the `emcid bench` subcommand that reads it
    fixed: tuple[str, ...]
    positive: tuple[str, str, str]  # columns of: prompt drawn, source text, destination text
    negative: tuple[str, str]  # columns of: prompt drawn (also its source text), destination text

    def count(self, header: Sequence[str], pattern: str) -> int:
        """How many numbered columns ``pattern`` has, counting 1, 2, ... until one is missing."""
        k = 0
        while pattern.format(k + 1) in header:
            k += 1
        return k

    def required(self, header: Sequence[str]) -> list[str]:
        """Every column a file with this header must have, in the layout's order."""
        positives, negatives = self.count(header, self.positive[0]), self.count(header, self.negative[0])
        columns = list(self.fixed)
        columns += [p.format(k) for k in range(1, max(positives, 1) + 1) for p in self.positive]
        columns += [p.format(k) for k in range(1, max(negatives, 1) + 1) for p in self.negative]
        return columns

    def describe(self) -> str:
        numbered = [p.format("<k>") for p in (*self.positive, *self.negative)]
        return ", ".join((*self.fixed, *numbered))


TIMED = Layout("TIMED", "timed", ("old", "new"), ("positive{}", "positive{}", "gt{}"),
               ("negative{}", "gn{}"))
ROAD = Layout("RoAD", "road", ("prompt", "old", "new"),
              ("positive{}", "positive_old{}", "positive_new{}"), ("negative{}", "negative_new{}"))
LAYOUTS = {layout.command: layout for layout in (TIMED, ROAD)}


def split_article(text: str) -> tuple[str, str]:
    """("A", "pair of jeans") from "A pair of jeans"; ("", text) when no article leads."""
    first, _, rest = text.strip().partition(" ")
    if first.lower() in ARTICLES and rest.strip():
        return first, rest.strip()
    return "", text.strip()


def unique_prompts(prompts: Sequence[str]) -> tuple[str, ...]:
    """The templates in order, each once (compared case-insensitively)."""
    seen: dict[str, str] = {}
    for prompt in prompts:
        seen.setdefault(prompt.lower(), prompt)
    return tuple(seen.values())


def timed_request(old: str, new: str, seed: int = 0) -> EditRequest:
    """A TIMED row's edit: the old prompt's subject (the prompt without its article) becomes
    the new prompt's, in the old prompt's own template and the editing templates.

    "A pair of jeans" -> "A pair of white jeans" edits "pair of jeans" into "pair of white
    jeans", in "A {}", "An image of {}", "A photo of {}" and "{}".
    """
    article, source = split_article(old)
    _, destination = split_article(new)
    own = f"{article} {{}}" if article else "{}"
    return EditRequest(source, destination, unique_prompts((own, *OBJECT_PROMPTS)), seed=seed)


def road_request(prompt: str, new: str, seed: int = 0) -> EditRequest:
    """A RoAD row's edit: the prompt's concept (a role, "Canada's Prime Minister") becomes the
    new text ("Beyonce") in the editing templates, as ReFACT edits the whole prompt."""
    return EditRequest(prompt, new, OBJECT_PROMPTS, seed=seed)


def _check_columns(path: Path, header: list[str], layout: Layout) -> None:
    """Every column of ``layout`` is there, or one line naming the first missing one (and the
    other layout, when the file is in it)."""
    missing = [name for name in layout.required(header) if name not in header]
    if not missing:
        return
    other = next((o for o in LAYOUTS.values() if o is not layout
                  and all(name in header for name in o.required(header))), None)
    hint = (f"; this looks like a {other.name} file: run `emcid bench {other.command}`" if other
            else f" (a {layout.name} file has the columns {layout.describe()})")
    raise BenchmarkError(f"{path}: no column {missing[0]!r}{hint}")


def _row(cells: dict, header: list[str], layout: Layout, seed: int, path: Path, line: int) -> TimedRow:
    """One row as an edit and its probes; a bad cell or request names the line."""

    def cell(column: str) -> str:
        if not cells[column]:
            raise BenchmarkError(f"{path} line {line}: the cell of column {column!r} is empty")
        return cells[column]

    def numbered(patterns: Sequence[str]) -> list[list[str]]:
        return [[cell(p.format(k)) for p in patterns]
                for k in range(1, layout.count(header, patterns[0]) + 1)]

    positives = tuple(Probe(*texts) for texts in numbered(layout.positive))
    negatives = tuple(Probe(drawn, drawn, edited) for drawn, edited in numbered(layout.negative))
    try:
        if layout is TIMED:
            request = timed_request(cell("old"), cell("new"), seed)
            efficacy = Probe(cell("old"), cell("old"), cell("new"))
        else:
            request = road_request(cell("prompt"), cell("new"), seed)
            efficacy = Probe(cell("prompt"), cell("old"), cell("new"))
    except RequestError as exc:
        raise BenchmarkError(f"{path} line {line}: {exc}") from exc
    return TimedRow(line, request, (efficacy,), positives, negatives)


def load_rows(path: str | Path, layout: Layout | str = TIMED, seed: int = 0) -> list[TimedRow]:
    """The rows of a TIMED or RoAD CSV file (``layout``: a :class:`Layout` or "timed" / "road");
    ``seed`` is every request's (Stage I) seed. A missing column names the column and the
    file; an empty file, or a bad row (naming its line), is refused in one line."""
    layout = LAYOUTS[layout] if isinstance(layout, str) else layout
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: no such {layout.name} file")
    header, rows = read_rows(path)
    _check_columns(path, header, layout)
    loaded = [_row(cells, header, layout, seed, path, line) for line, cells in rows]
    if not loaded:
        raise BenchmarkError(f"{path}: the file has a header but no rows")
    return loaded


# --- metrics -------------------------------------------------------------------------------


def check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    """Generality thresholds are probabilities: each in [0, 1], refused before any work."""
    for value in thresholds:
        check_float("benchmark", "threshold", value, 0, 1)
    return tuple(float(v) for v in thresholds)


def row_figures(efficacy: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict:
    """One row's figures from the judge's P(destination) of each image (any shape per group).

    As in TIMED and ReFACT an image shows the destination when the judge prefers the
    destination's text (P > 0.5) and keeps the source when it prefers the source's (P < 0.5):
    efficacy and generality are the shares of the edited prompt's and the positives' images
    that show the destination, specificity the share of the negatives' that keep the source.
    ``generality_at`` counts positives above each threshold; ``mean_p`` keeps the soft values.
    """
    groups = {"efficacy": efficacy, "generality": positives, "specificity": negatives}
    for name, values in groups.items():
        if values.numel() == 0:
            raise BenchmarkError(f"a row has no images for {name}")
    return {
        "efficacy": float((efficacy > 0.5).double().mean()),
        "generality": float((positives > 0.5).double().mean()),
        "specificity": float((negatives < 0.5).double().mean()),
        "generality_at": {str(t): float((positives > t).double().mean()) for t in thresholds},
        "mean_p_destination": {name: float(values.double().mean()) for name, values in groups.items()},
    }


def mean_figures(figures: Sequence[dict]) -> dict:
    """The mean over rows of each figure (nested ones too): every row weighs the same."""
    first = figures[0]
    return {key: mean_figures([f[key] for f in figures]) if isinstance(value, dict)
            else sum(f[key] for f in figures) / len(figures) for key, value in first.items()}
