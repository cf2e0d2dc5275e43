"""Do Stage I targets computed under bf16/fp16 autocast match the fp32 ones?

Runs Stage I on the same concepts in fp32 and in each lower precision and prints, per
precision, the cosine between each concept's delta and its fp32 delta (mean and minimum)
and the relative norm difference. On the embedded model (default) the release settings
are used; ``--family sd1`` uses the SD 1.4-shaped random pipeline of ``sd_scale.py``.

    python benchmarks/precision_agreement.py [--family mini|sd1] [--concepts 16] [--steps 200]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

import emcid
from emcid.core.cache import TensorCache
from emcid.core.config import Runtime
from emcid.editors.emcid.stage1 import Stage1Config, compute_z


def embedded_requests(bundle, count: int, seed: int) -> list[emcid.EditRequest]:
    from emcid.bench.worlds import world_for

    classes = [c for c in world_for(bundle).classes if not c.holdout_only]
    pairs = [random.Random(seed + i).sample(classes, 2) for i in range(count)]
    return [emcid.EditRequest(a.name, b.name, seed=i) for i, (a, b) in enumerate(pairs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--family", choices=["mini", "sd1"], default="mini")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--concepts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--precisions", default="bf16,fp16")
    args = parser.parse_args()
    if args.family == "mini":
        bundle = emcid.load_model(device=args.device)
        requests = embedded_requests(bundle, args.concepts, 0)
        config = Stage1Config(steps=args.steps, stop_tolerance=0.0, image_guidance_scale=None,
                              image_steps=None)
        z_layer = {"text_encoder": bundle.slot("text_encoder").num_layers - 2}
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from sd_scale import build_bundle, requests_for

        bundle = build_bundle("sd1", args.device, True, ["a photo"])
        requests = requests_for(args.concepts)
        config = Stage1Config(steps=args.steps, stop_tolerance=0.0, image_steps=10)
        z_layer = {"text_encoder": 10}
    images = TensorCache("precision-images", enabled=False)
    results = {}
    for precision in ["fp32"] + args.precisions.split(","):
        start = time.perf_counter()
        runtime = Runtime(concept_batch=args.concepts, precision=precision)
        targets = compute_z(bundle, requests, z_layer, config, images, runtime)
        seconds = time.perf_counter() - start
        results[precision] = torch.stack([t.deltas["text_encoder"].float().cpu() for t in targets])
        print(f"{precision}: {len(requests)} concepts x {args.steps} steps in {seconds:.1f} s")
    reference = results["fp32"]
    for precision, deltas in results.items():
        if precision == "fp32":
            continue
        cos = torch.nn.functional.cosine_similarity(deltas, reference, dim=1)
        rel = (deltas - reference).norm(dim=1) / reference.norm(dim=1)
        print(f"{args.family} {precision} vs fp32: cosine mean {cos.mean():.4f} min {cos.min():.4f}; "
              f"relative difference mean {rel.mean():.4f} max {rel.max():.4f}")


if __name__ == "__main__":
    main()
