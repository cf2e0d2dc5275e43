"""How many edits is one style worth to Stage II? Its keys' participation ratio, per edited block.

    python benchmarks/style_key_count.py [--styles 40] [--written 12] [--threads 1]

For the first N styles of the style benchmark (`emcid/bench/styles.py`), the artist task's
prompts (the release's three, the default style contexts, then ``--written`` more contexts
for Stage II alone, docs/method.md "Style contexts") are read at every edited block's fc2 input
at the style's token, one key per prompt (``keys="prompt"``). For each style the participation
ratio ``(sum e)^2 / sum e^2`` of the eigenvalues ``e`` of its keys' Gram matrix says how many
independent keys it holds: 1 when every prompt's key is the same, the prompt count when they
are orthogonal. Printed twice per block: in plain coordinates, and in the metric of the
preservation statistics ``C`` (keys whitened by ``C^-1/2``, the coordinates in which Stage II's
closed form trades an edit against what it keeps). A ``lam_edits`` rule that counted key
columns would count each style this many times.
"""

from __future__ import annotations

import argparse

import torch

import emcid
from emcid.bench.styles import style_split
from emcid.core.hooks import capture
from emcid.core.tokens import subject_positions
from emcid.editors import get_editor
from emcid.editors.emcid.contexts import style_context_prompts, written_context_prompts


def participation_ratio(keys: torch.Tensor) -> float:
    """``(sum e)^2 / sum e^2`` over the eigenvalues of ``keys keys^T`` (rows are keys)."""
    values = torch.linalg.eigvalsh(keys @ keys.T).clamp(min=0)
    return float(values.sum() ** 2 / values.pow(2).sum())


def whitening(second_moment: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """``C^-1/2``, eigenvalues below ``floor`` times the largest raised to it."""
    values, vectors = torch.linalg.eigh(second_moment.double())
    return vectors @ torch.diag(values.clamp(min=float(values.max()) * floor).rsqrt()) @ vectors.T


@torch.no_grad()
def fc2_keys(bundle, slot_name: str, indices: list[int], prompts: list[str],
             positions: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each block's fc2 input at one token per prompt, (prompts, width), on the unedited model."""
    slot = bundle.slot(slot_name)
    with capture({str(i): slot.fc2(i) for i in indices}, positions, "input") as records:
        bundle.encode(prompts)
    return {i: records[str(i)][0].double().cpu() for i in indices}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:tasks")
    parser.add_argument("--styles", type=int, default=40)
    parser.add_argument("--written", type=int, default=12, help="contexts for Stage II alone")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = emcid.load_model(args.model)
    styles = style_split(0, 100, 100).artists[:args.styles]
    editor = get_editor("emcid", bundle, task="artist")
    config, layers = editor.config, editor.layers_for(bundle)
    moments = editor.second_moments(bundle, layers, False, styles)
    templates = []
    for style in styles:
        taken = tuple(config.default_prompts) + style_context_prompts(bundle, style, config.style_contexts)
        templates.append(taken + written_context_prompts(bundle, style, args.written, taken))
    print(f"{len(styles)} styles, {len(templates[0])} prompts each; participation ratio of each "
          "style's keys, mean (min-max)")
    for slot_name, indices in layers.items():
        slot = bundle.slot(slot_name)
        prompts = [t.format(s) for s, ts in zip(styles, templates, strict=True) for t in ts]
        positions = torch.cat([subject_positions(slot.tokenizer, list(ts), s)
                               for s, ts in zip(styles, templates, strict=True)])
        owner = torch.repeat_interleave(torch.tensor([len(ts) for ts in templates]))
        for layer, keys in fc2_keys(bundle, slot_name, sorted(indices), prompts, positions).items():
            white = whitening(moments[slot.fc2_name(layer)])
            plain = [participation_ratio(keys[owner == i]) for i in range(len(styles))]
            metric = [participation_ratio(keys[owner == i] @ white) for i in range(len(styles))]
            print(f"{slot.fc2_name(layer)}: plain {sum(plain) / len(plain):.2f} ({min(plain):.2f}-"
                  f"{max(plain):.2f}); in C's metric {sum(metric) / len(metric):.2f} "
                  f"({min(metric):.2f}-{max(metric):.2f})")


if __name__ == "__main__":
    main()
