"""How far Stage I's text alignment term can reach: the pooled output's change when a vector
is added at block l*'s output at the subject token.

    python benchmarks/align_reach.py [--model embedded:tasks] [--prompts 20]

Stage I's second loss term pulls the edited encoder's pooled output (the end-of-text token's
final state) towards the destination's (docs/method.md, section 4). Its gradient reaches delta
only through the blocks after l*, where the end-of-text token attends to the subject. For
``--prompts`` editing prompts of seeded classes, a random vector as long as the subject's own
state at l* is added there; printed per block: the pooled output's change and the subject
token's final-state change, each over its unedited norm (mean over prompts). A term whose
pooled change is near 0 cannot move delta, and Stage I is then noise distillation alone.
"""

from __future__ import annotations

import argparse
import random

import torch

TEMPLATE = "An image of {}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a pipeline folder or hub id (default: the embedded model)")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import emcid
    from emcid.bench.worlds import world_for
    from emcid.core.hooks import add_at_positions
    from emcid.core.tokens import subject_positions
    from emcid.editors import get_editor

    bundle = emcid.load_model(args.model)
    if bundle.family == "sdxl":
        raise SystemExit("one text encoder only (SD 1.x / 2.x / the embedded model)")
    names = [c.name for c in world_for(bundle).classes]
    subjects = random.Random(args.seed).sample(names, min(args.prompts, len(names)))
    prompts = [TEMPLATE.format(s) for s in subjects]
    slot = bundle.slot("text_encoder")
    last = max(get_editor("emcid", bundle).layers_for(bundle)["text_encoder"])
    ids = bundle.tokenize(prompts)
    positions = torch.cat([subject_positions(slot.tokenizer, [TEMPLATE], s) for s in subjects])
    generator = torch.Generator().manual_seed(args.seed)
    print(f"{args.model or 'embedded'}: {len(prompts)} prompts, at the subject a random vector "
          "as long as the subject's state")
    print("| block | pooled change / norm | subject's final state change / norm |")
    print("| --- | --- | --- |")
    with torch.no_grad():
        base = bundle.encode_ids(ids)
        hidden = slot.encoder(ids[0], output_hidden_states=True).hidden_states  # [i + 1]: block i
        rows = torch.arange(len(prompts))
        for block in sorted({0, last // 2, last - 1, last}):
            at_subject = hidden[block + 1][rows, positions]
            own = at_subject.norm(dim=1, keepdim=True)
            vectors = torch.randn(at_subject.shape, generator=generator)
            vectors = vectors / vectors.norm(dim=1, keepdim=True) * own
            with add_at_positions(slot.block(block), positions, vectors):
                moved = bundle.encode_ids(ids)
            pooled = ((moved.pooled[0] - base.pooled[0]).norm(dim=1) / base.pooled[0].norm(dim=1)).mean()
            subject = ((moved.embeds[rows, positions] - base.embeds[rows, positions]).norm(dim=1)
                       / base.embeds[rows, positions].norm(dim=1)).mean()
            label = f"{block} (l*)" if block == last else str(block)
            print(f"| {label} | {float(pooled):.4f} | {float(subject):.3f} |")


if __name__ == "__main__":
    main()
