"""How the Stage II preservation weight lambda trades efficacy for specificity on a model.

The release value (4000) was tuned on SD 1.x, whose fc2 inputs are 3072 wide; the embedded
model's are 512 wide. This measures, on the text encoder alone (text-only Stage I targets,
the MEMIT-style variant, so no UNet is involved), for several lambdas and edit counts:

- target reached: the fraction of the distance from the block-l* state at the subject token
  to its Stage I target that the edit closes (what Stage II is asked to do; 1 = exact);
- efficacy: the fraction of the distance between the source prompt's pooled output and the
  destination prompt's (unedited) pooled output that the edit closes;
- specificity: the mean relative change of holdout prompts' conditioning (all tokens).

    python benchmarks/lambda_width.py [--model M] [--lams 4000,667,100] [--edits 10,100]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile

import torch

import emcid
from emcid.concepts import imagenet1k_classes
from emcid.core.hooks import capture
from emcid.editors.emcid.stage1 import compute_targets
from emcid.requests import subject_positions


def concept_names(bundle, count: int, seed: int) -> list[str]:
    """Class names of the model's world (the embedded one's, else ImageNet's), shuffled."""
    if bundle.is_embedded:
        from emcid.mini.world import load_concepts

        names = [c.names[0] for c in load_concepts()]
    else:
        names = [c.name for c in imagenet1k_classes()]
    random.Random(seed).shuffle(names)
    return names[:count]


@torch.no_grad()
def conditioning(bundle, prompts: list[str]) -> torch.Tensor:
    return torch.cat([bundle.encode(prompts[i:i + 256]).embeds for i in range(0, len(prompts), 256)])


@torch.no_grad()
def pooled(bundle, prompts: list[str]) -> torch.Tensor:
    return torch.cat([bundle.encode(prompts[i:i + 256]).pooled[0] for i in range(0, len(prompts), 256)])


@torch.no_grad()
def subject_states(bundle, requests, layer: int) -> torch.Tensor:
    slot = bundle.slots()[0]
    rows = []
    for request in requests:
        positions = subject_positions(slot.tokenizer, request.prompts, request.source)
        with capture({"b": slot.block(layer)}, positions) as records:
            bundle.encode(request.source_prompts())
        rows.append(records["b"][0])
    return torch.cat(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model")
    parser.add_argument("--lams", default="4000,667,100")
    parser.add_argument("--edits", default="10,100")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--holdout", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("EMCID_CACHE", tempfile.mkdtemp(prefix="emcid-lambda-"))
    bundle = emcid.load_model(args.model)
    largest = max(int(e) for e in args.edits.split(","))
    names = concept_names(bundle, 2 * largest + args.holdout, args.seed)
    sources, destinations = names[:largest], names[largest:2 * largest]
    holdout = [f"A photo of {n}" for n in names[2 * largest:]]
    width = bundle.slots()[0].encoder.config.intermediate_size
    print(f"model {bundle.source}: fc2 input width {width}; text-only targets, {args.steps} steps")
    editor = emcid.editors.get_editor("memit", bundle, steps=args.steps)
    z_layer = max(editor.layers_for(bundle)["text_encoder"])
    print("edits  lambda  target_reached  efficacy  holdout_change")
    for count in (int(e) for e in args.edits.split(",")):
        requests = [emcid.EditRequest(s, d, seed=i) for i, (s, d) in
                    enumerate(zip(sources[:count], destinations[:count]))]
        src_prompts = [p for r in requests for p in r.source_prompts()]
        dst = pooled(bundle, [p for r in requests for p in r.destination_prompts()])
        src_before, kept_before = pooled(bundle, src_prompts), conditioning(bundle, holdout)
        targets = compute_targets(bundle, requests, {"text_encoder": z_layer}, editor.config.stage1,
                                  progress=False)
        z = torch.cat([t.targets("text_encoder") for t in targets])
        z_before = subject_states(bundle, requests, z_layer)
        for lam in (float(x) for x in args.lams.split(",")):
            patch = emcid.edit(bundle, requests, method="memit", progress=False, lam=lam,
                               steps=args.steps, stats_samples=20000)
            with patch.applied(bundle):
                src_after, kept_after = pooled(bundle, src_prompts), conditioning(bundle, holdout)
                z_after = subject_states(bundle, requests, z_layer)
            reached = 1 - (z_after - z).norm(dim=1) / (z_before - z).norm(dim=1)
            closed = 1 - (src_after - dst).norm(dim=1) / (src_before - dst).norm(dim=1)
            change = (kept_after - kept_before).norm(dim=(1, 2)) / kept_before.norm(dim=(1, 2))
            row = f"{count:5d}  {lam:6.0f}  {reached.mean():14.3f}  {closed.mean():8.3f}"
            print(f"{row}  {change.mean():14.4f}", flush=True)


if __name__ == "__main__":
    main()
