"""How much of Stage I's style-erasure target Stage II writes, on the embedded world.

    python benchmarks/style_reach.py --edits 10,100 --lams 4000,1000,250 [--option style_contexts=0]

Erases the first N styles of the style benchmark (`emcid/bench/styles.py`: the artist task's
presets on ``embedded:tasks``, destination "") and reads the last edited block's output
(l*) at the style's last token, on the text encoder alone (no images), for each Stage II
preservation weight lambda:

- reach (edited prompts): the fraction of the distance from the unedited state to Stage I's
  target that the edit closes, on the prompts Stage I optimised (the artist prompts, and the
  style contexts unless ``--option style_contexts=0``; 1 = written exactly);
- carried (styled objects): on the benchmark's "An image of Y in the style of X", prompts
  Stage I never saw, the change at X's token projected on X's Stage I delta, as a fraction of
  that delta;
- objects: the mean relative change of held-out objects' prompts' conditioning (all tokens),
  the direction that costs the objects' images.

Stage I runs once per scale (cached); only Stage II changes with lambda.
"""

from __future__ import annotations

import argparse

import torch

import emcid
from emcid.bench.styles import erase_requests, style_probe, style_split
from emcid.core.config import parse_option
from emcid.core.hooks import capture
from emcid.core.tokens import subject_positions
from emcid.requests.edit import validate_requests
from emcid.tasks.edit import edit_patch
from emcid.tasks.erase import resolve_erase


def templates_of(prompts, style: str) -> list[str]:
    """Each prompt with its (last) mention of ``style`` turned back into "{}"."""
    return ["{}".join(p.rsplit(style, 1)) for p in prompts]


@torch.no_grad()
def states_at_style(bundle, layer: int, style: str, prompts) -> torch.Tensor:
    """The block-``layer`` output at ``style``'s last token of each prompt: (n, width)."""
    slot = bundle.slots()[0]
    templates = templates_of(prompts, style)
    positions = subject_positions(slot.tokenizer, templates, style)
    with capture({"b": slot.block(layer)}, positions) as records:
        bundle.encode([t.format(style) for t in templates])
    return records["b"][0]


@torch.no_grad()
def conditioning(bundle, prompts: list[str]) -> torch.Tensor:
    return torch.cat([bundle.encode(prompts[i:i + 128]).embeds for i in range(0, len(prompts), 128)])


def readings(bundle, layer: int, probes, requests) -> tuple[list, list]:
    """Per style: l* states on the edited prompts and on the styled-object prompts."""
    edited = [states_at_style(bundle, layer, r.source, [p.format(r.source) for p in r.prompts])
              for r in requests]
    styled = [states_at_style(bundle, layer, p.style, [q for q in p.prompts if " in the style of " in q])
              for p in probes]
    return edited, styled


def figures(before, after, targets, deltas) -> tuple[float, float]:
    reach, carried = [], []
    for h0, h1, z in zip(before[0], after[0], targets, strict=True):
        reach.append((1 - (h1 - z).norm(dim=1) / (h0 - z).norm(dim=1)).mean())
    for h0, h1, d in zip(before[1], after[1], deltas, strict=True):
        carried.append(((h1 - h0) @ d / d.dot(d)).mean())
    return float(torch.stack(reach).mean()), float(torch.stack(carried).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:tasks")
    parser.add_argument("--edits", default="10,100")
    parser.add_argument("--lams", default="4000,1000,250")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an editor option over the artist presets (repeatable)")
    args = parser.parse_args()
    options = dict(parse_option(text) for text in args.option)
    torch.set_num_threads(args.threads)
    bundle = emcid.load_model(args.model)
    split = style_split(args.seed)
    from emcid.mini.world import load_concepts

    names = [c.name for c in load_concepts()]
    objects = [f"An image of {names[i]}" for i in split.held_objects]
    kept_before = conditioning(bundle, objects)
    print("edits  lambda  reach  carried  objects_change", flush=True)
    for count in (int(x) for x in args.edits.split(",")):
        styles = split.artists[:count]
        probes = [style_probe(s, args.seed) for s in styles]
        editor = emcid.editors.get_editor("emcid", bundle, task="artist", **options)
        requests = resolve_erase(bundle, validate_requests(editor.prepare(erase_requests(styles), bundle)))
        layers = editor.layers_for(bundle)
        layer = max(layers["text_encoder"])
        found = editor.stage1_targets(bundle, requests, layers, progress=False)
        targets = [t.targets("text_encoder") for t in found]
        deltas = [t.deltas["text_encoder"] for t in found]
        before = readings(bundle, layer, probes, requests)
        for lam in (float(x) for x in args.lams.split(",")):
            editor = emcid.editors.get_editor("emcid", bundle, task="artist", **{**options, "lam": lam})
            patch = edit_patch(editor, bundle, erase_requests(styles), progress=False)
            with patch.applied(bundle):
                after = readings(bundle, layer, probes, requests)
                kept_after = conditioning(bundle, objects)
            reach, carried = figures(before, after, targets, deltas)
            change = ((kept_after - kept_before).norm(dim=(1, 2)) / kept_before.norm(dim=(1, 2))).mean()
            print(f"{count:5d}  {lam:6.0f}  {reach:5.3f}  {carried:7.3f}  {change:14.4f}", flush=True)


if __name__ == "__main__":
    main()
