"""The model-loading flags every benchmark command shares (imported by each command module, so
that none of them imports :mod:`emcid.bench.cli`, which registers them all)."""

from __future__ import annotations

import argparse

DTYPE_HELP = ("the model weights' dtype (default: float32); Stage I's autocast is another setting, "
              "the editor's precision (`bench iceb --precision`, `emcid edit --precision`)")


def add_model_flags(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    """``--device``, ``--weights-dtype`` (unless ``dtype`` is False) and ``--allow-pickle``."""
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda")
    if dtype:
        parser.add_argument("--weights-dtype", "--dtype", dest="dtype", default="float32",
                            choices=["float32", "float16", "bfloat16"], help=DTYPE_HELP)
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow .bin/.ckpt checkpoints (they can run code when loaded)")
