"""Benchmarks: ICEB (the ImageNet Concept Editing Benchmark) and the demo built on it."""

from .iceb import DEFAULT_SCALES, METRICS, IcebConfig, run_iceb

__all__ = ["DEFAULT_SCALES", "METRICS", "IcebConfig", "run_iceb"]
