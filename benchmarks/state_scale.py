"""The scale of the states Stage I edits: ||v|| and its per-element RMS at block l* at the
subject token, for a few concepts, on any model (docs/method.md, "Stage I's learning rate").

    python benchmarks/state_scale.py --model embedded:tasks --concepts tench,maypole,lotion

Adam moves every element of delta by about ``lr`` per step whatever the gradient's size, so
how far 200 steps at the release's 0.2 can take delta depends on this scale.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder, hub id or embedded:tasks "
                        "(default: the embedded model)")
    parser.add_argument("--concepts", default="tench,maypole,confectionery,lotion,volcano")
    parser.add_argument("--template", default="An image of {}")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import emcid
    from emcid.core.tokens import subject_positions
    from emcid.editors import get_editor
    from emcid.editors.emcid.stage1.start import record_block_outputs

    bundle = emcid.load_model(args.model)
    layers = get_editor("emcid", bundle).layers_for(bundle)
    z_layer = {slot: max(indices) for slot, indices in layers.items()}
    concepts = args.concepts.split(",")
    prompts = [args.template.format(c) for c in concepts]
    for name, states in record_block_outputs(bundle, z_layer, lambda: bundle.encode(prompts)).items():
        tokenizer = bundle.slot(name).tokenizer
        print(f"{name}, block l* = {z_layer[name]}, width {states.shape[-1]}:")
        for row, concept in enumerate(concepts):
            v = states[row, subject_positions(tokenizer, [args.template], concept)[0]].float()
            rms = v.norm() / v.numel() ** 0.5
            print(f"  {concept:>16s}: ||v|| {v.norm():8.2f}   per-element RMS {rms:7.3f}")


if __name__ == "__main__":
    main()
