"""Where Stage I starts, judged on Stage I alone: P(destination) of far edits (docs/method.md).

For each pair, Stage I's objective (noise prediction against the unedited model on the
destination prompts, on noised images of the source, plus the pooled text alignment, the
norm decay and clamp; release values, one concept, the editing templates) is optimised from
a start, and its delta is added at block l*'s output at the subject token alone (no Stage II)
while the embedded model draws the editing templates and the class's free-form prompts.

Starts: ``zero`` (the release), ``estimate`` (the text estimate h_dst - h_src itself, no
steps), ``text`` (emcid: the estimate, then the steps), ``zero-both`` (zero, with the
destination's images beside the source's in the noise loss).

    python benchmarks/stage1_start.py [--pairs tench:goldfish,volcano:beacon] [--random 2]
        [--starts zero,estimate,text,zero-both] [--steps 200]
"""

from __future__ import annotations

import argparse
import random

import torch
from diffusers import DDPMScheduler

TEMPLATES = ("An image of {}", "A photo of {}", "{}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="tench:goldfish,volcano:beacon")
    parser.add_argument("--random", type=int, default=2, help="random far pairs added (seeded)")
    parser.add_argument("--starts", default="zero,estimate,text,zero-both")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--images", type=int, default=4, help="seeds per prompt")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import emcid
    from emcid.bench.judges import load_judge
    from emcid.bench.worlds import world_for
    from emcid.cache import TensorCache

    bundle = emcid.load_model()
    probe = StartProbe(bundle, load_judge(bundle), world_for(bundle), TensorCache("images"))
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",") if p]
    rng = random.Random(7)
    edit = [c for c in probe.world.classes if not c.holdout_only]
    hold = [c for c in probe.world.classes if c.holdout_only]
    pairs += [(rng.choice(edit).name, rng.choice(hold).name) for _ in range(args.random)]
    print(f"embedded model; Stage I alone, {args.steps} steps; P(source) / P(destination), "
          f"{args.images} images per prompt")
    print("| start | pair | loss (last 20 steps) | cos(delta, estimate) | templates | free-form |")
    print("| --- | --- | --- | --- | --- | --- |")
    for start in args.starts.split(","):
        for src, dst in pairs:
            delta, loss, cos = probe.optimise(src, dst, start, 0 if start == "estimate" else args.steps)
            shown = probe.judge_delta(src, dst, delta, args.images)
            print(f"| {start} | {src} -> {dst} | {loss:.3f} | {cos:.2f} | "
                  + " | ".join(f"{s:.2f} / {d:.2f}" for s, d in shown) + " |", flush=True)


class StartProbe:
    """Stage I's objective for one concept, and images drawn with its delta at l* alone."""

    def __init__(self, bundle, judge, world, image_cache):
        from emcid.generation import stock_pipeline

        self.bundle, self.judge, self.world, self.cache = bundle, judge, world, image_cache
        self.stock = stock_pipeline(bundle)
        self.block = bundle.slot("text_encoder").block(bundle.slot("text_encoder").num_layers - 2)
        self.classes = {c.name: c for c in world.classes}

    def _states(self, prompts: list[str], subject: str) -> torch.Tensor:
        from emcid.hooks import capture, gather_positions
        from emcid.requests import subject_positions

        with torch.no_grad(), capture({"l": self.block}) as record:
            self.bundle.encode(prompts)
        positions = subject_positions(self.bundle.tokenizer, TEMPLATES, subject)
        return gather_positions(record["l"][0].float(), positions)

    def _latents(self, prompts: list[str]) -> torch.Tensor:
        from emcid.generation import encode_images, generate_cached, resolve_settings

        arrays = generate_cached(self.bundle, prompts, list(range(len(prompts))), self.cache,
                                 progress=False, **resolve_settings(self.bundle))
        return encode_images(self.bundle, arrays.permute(0, 3, 1, 2).float() / 127.5 - 1.0)

    def _encode(self, prompts: list[str], positions: torch.Tensor, delta: torch.Tensor):
        from emcid.hooks import add_at_positions

        with add_at_positions(self.block, positions, delta):
            return self.bundle.encode(prompts)

    def optimise(self, src: str, dst: str, start: str, steps: int,
                 lr: float = 0.2, align: float = 0.01, decay: float = 5e-4,
                 clamp: float = 1.5) -> tuple[torch.Tensor, float, float]:
        """Stage I's release objective and optimiser from ``start``: (delta, loss, cosine)."""
        from emcid.requests import subject_positions

        src_prompts = [t.format(src) for t in TEMPLATES]
        dst_prompts = [t.format(dst) for t in TEMPLATES]
        h_src = self._states(src_prompts, src)
        estimate = (self._states(dst_prompts, dst) - h_src).mean(0)
        latents, rows = self._latents(src_prompts), [0, 1, 2]
        if start == "zero-both":
            latents, rows = torch.cat([latents, self._latents(dst_prompts)]), rows * 2
        positions = subject_positions(self.bundle.tokenizer, TEMPLATES, src)[rows]
        with torch.no_grad():
            teacher = self.bundle.encode([dst_prompts[r] for r in rows])
        v_norm = h_src[0].norm()
        delta = (estimate.clone() if start in ("text", "estimate") else torch.zeros_like(estimate))
        delta.requires_grad_(True)
        optimiser = torch.optim.Adam([delta], lr=lr)
        alphas = DDPMScheduler.from_config(self.bundle.scheduler.config).alphas_cumprod
        generator, losses = torch.Generator().manual_seed(0), []
        for _ in range(steps):
            t = torch.randint(0, len(alphas), (len(rows),), generator=generator)
            noise = torch.randn(latents.shape, generator=generator)
            a = alphas[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            edited = self._encode([src_prompts[r] for r in rows], positions, delta)
            prediction = self.bundle.unet(noisy, t, encoder_hidden_states=edited.embeds).sample
            with torch.no_grad():
                goal = self.bundle.unet(noisy, t, encoder_hidden_states=teacher.embeds).sample
            loss = ((prediction - goal).pow(2).mean()
                    + align * (edited.pooled[0] - teacher.pooled[0]).pow(2).mean()
                    + decay * delta.norm() / v_norm ** 2)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                delta.mul_(torch.clamp(clamp * v_norm / delta.norm(), max=1.0))
            losses.append(loss.item())
        tail = losses[-20:]
        cosine = torch.nn.functional.cosine_similarity(delta.detach(), estimate, dim=0)
        return delta.detach(), sum(tail) / len(tail) if tail else float("nan"), float(cosine)

    @torch.no_grad()
    def judge_delta(self, src: str, dst: str, delta: torch.Tensor, images: int) -> list[tuple[float, float]]:
        """(P(source), P(destination)) on the templates and on the free-form prompts."""
        from emcid.generation import decode_latents, resolve_settings, to_pil
        from emcid.requests import subject_positions

        source, destination = self.classes[src], self.classes[dst]
        shown = []
        for templates in (list(TEMPLATES), [t for t, _ in source.free_form]):
            positions = subject_positions(self.bundle.tokenizer, templates, src)
            prompts = [t.format(src) for t in templates for _ in range(images)]
            seeds = [1000 + 17 * j + s for j in range(len(templates)) for s in range(images)]
            encoding = self._encode(prompts, positions.repeat_interleave(images), delta)
            latents = self.stock(prompt_embeds=encoding.embeds, output_type="latent",
                                 generator=[torch.Generator().manual_seed(s) for s in seeds],
                                 **resolve_settings(self.bundle)).images
            probs = self.judge.predict_proba(to_pil(decode_latents(self.bundle, latents)))
            shown.append((float(probs[:, source.index].mean()), float(probs[:, destination.index].mean())))
        return shown


if __name__ == "__main__":
    main()
