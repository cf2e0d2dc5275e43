"""Measure the embedded model's bars (docs/mini.md) on it and print them.

    python benchmarks/mini_bars.py                       # all 2,000 concepts (slow on CPU)
    python benchmarks/mini_bars.py --concepts 400        # a seeded subset
    python benchmarks/mini_bars.py --grid docs/mini_samples.png

Bars: judge top-1 >= 85 % on the editing templates, >= 80 % on the free-form prompts,
>= 75 % on the aliases meant to work; sampling >= 25 images/s at batch 64 with guidance.
One image per prompt; seeds are fixed, so the numbers are reproducible.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import emcid
from emcid.core.generation import generate
from emcid.mini import default_model_dir, world
from emcid.mini.judge import judge_accuracy, load_judge


def top1(judge, images: list[Image.Image], labels: list[int]) -> tuple[float, str]:
    """Top-1 and, as a diagnostic, how often each attribute of the prediction is right."""
    if not labels:
        return float("nan"), ""
    pred = judge.predict_proba(images).argmax(-1).tolist()
    concepts = world.load_concepts()
    parts = []
    for attr in ("shape", "fg", "bg"):
        ok = [getattr(concepts[p], attr) == getattr(concepts[t], attr) for p, t in zip(pred, labels)]
        parts.append(f"{attr} {sum(ok) / len(ok):.3f}")
    acc = sum(p == t for p, t in zip(pred, labels)) / len(labels)
    return acc, ", ".join(parts)


def throughput(bundle, n_batches: int = 3, batch: int = 64) -> float:
    """Images per second at batch 64 with the model's guidance and steps (after a warm-up)."""
    prompts = [world.EDIT_TEMPLATES[0].format(c.name) for c in world.load_concepts()[:batch]]
    generate(bundle, prompts[:8], list(range(8)), progress=False)
    t0 = time.perf_counter()
    for k in range(n_batches):
        generate(bundle, prompts, [k * batch + i for i in range(batch)], batch_size=batch,
                 progress=False)  # fmt: skip
    return n_batches * batch / (time.perf_counter() - t0)


def sample_grid(bundle, concepts, path: Path, n: int = 12, per: int = 4) -> None:
    """Rows: the true render, then `per` generated images (edit template 0, seeds 0..)."""
    pick = random.Random(3).sample(concepts, n)
    prompts = [world.EDIT_TEMPLATES[0].format(c.name) for c in pick for _ in range(per)]
    seeds = [k for _ in pick for k in range(per)]
    images = generate(bundle, prompts, seeds, progress=False)
    cell, label_w = 64, 260
    grid = Image.new("RGB", (label_w + cell * (per + 1), cell * n), "white")
    draw = ImageDraw.Draw(grid)
    for r, c in enumerate(pick):
        draw.text((4, r * cell + cell // 2 - 6), f"{c.index}: {c.name}"[:40], fill="black")
        grid.paste(world.render(c.index, 0).resize((cell, cell), Image.NEAREST), (label_w, r * cell))
        for k in range(per):
            img = images[r * per + k].resize((cell, cell), Image.NEAREST)
            grid.paste(img, (label_w + cell * (k + 1), r * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(default_model_dir()))
    parser.add_argument("--concepts", type=int, default=2000, help="seeded subset size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, help="override the model's sampling steps")
    parser.add_argument("--guidance", type=float, help="override the model's guidance")
    parser.add_argument("--grid", type=Path, help="write a sample grid PNG here")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bundle = emcid.load_model(args.model)
    if args.steps is not None:
        bundle.sampling["num_inference_steps"] = args.steps
    if args.guidance is not None:
        bundle.sampling["guidance_scale"] = args.guidance
    judge = load_judge()
    concepts = world.load_concepts()
    if args.concepts < len(concepts):
        concepts = sorted(random.Random(0).sample(concepts, args.concepts), key=lambda c: c.index)
    results: dict[str, object] = {
        "model": args.model, "concepts": len(concepts), "threads": args.threads,
        "sampling": dict(bundle.sampling),
    }  # fmt: skip
    print(f"model {args.model}: {bundle.sampling}, {len(concepts)} concepts, "
          f"{args.threads} threads")  # fmt: skip

    results["judge_clean_top1"] = judge_accuracy(judge, seed=4242)
    print(f"judge, clean renders of all 2000 concepts: top-1 {results['judge_clean_top1']:.4f}"
          "  (bar >= 0.98)")  # fmt: skip

    groups = {
        "edit_templates": [
            (t.format(c.name), c.index * 3 + k, c.index)
            for c in concepts for k, t in enumerate(world.EDIT_TEMPLATES)
        ],
        "free_form": [(p, s, c.index) for c in concepts for p, s in world.free_form_prompts(c)],
        "aliases": [
            (t.format(a), 50_000 + c.index * 10 + j, c.index)
            for c in concepts for j, a in enumerate(c.good_names[1:])
            for t in world.EDIT_TEMPLATES
        ],
        "weak_aliases (meant to fail)": [
            (t.format(a), 90_000 + c.index * 10 + j, c.index)
            for c in concepts for j, a in enumerate(c.weak_aliases)
            for t in world.EDIT_TEMPLATES
        ],
    }  # fmt: skip
    bars = {"edit_templates": 0.85, "free_form": 0.80, "aliases": 0.75}
    for key, items in groups.items():
        t0 = time.perf_counter()
        images = generate(bundle, [p for p, _, _ in items], [s for _, s, _ in items])
        acc, attrs = top1(judge, images, [i for _, _, i in items])
        results[key] = acc
        bar = f"(bar >= {bars[key]:.2f}: {'met' if acc >= bars[key] else 'NOT met'})" if key in bars else ""
        print(f"{key}: {len(items)} images, top-1 {acc:.4f} {bar} ({attrs})  "
              f"[{time.perf_counter() - t0:.0f} s]")  # fmt: skip

    if not args.skip_throughput:
        ips = throughput(bundle)
        results["images_per_s"] = ips
        load = os.getloadavg()[0]
        results["load_average_1min"] = load
        print(f"throughput: {ips:.1f} images/s at batch 64 with guidance "
              f"({'met' if ips >= 25 else 'NOT met'}, bar >= 25; 1-min load average {load:.1f} "
              f"on {os.cpu_count()} CPUs)")  # fmt: skip
    if args.grid:
        sample_grid(bundle, world.load_concepts(), args.grid)
        print(f"grid written to {args.grid}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
