"""Stage I: per-concept target values by dual self-distillation (docs/method.md).

:mod:`.objective` holds the maths (the loss terms and :func:`compute_z`), :mod:`.conditioning`
and :mod:`.latents` the pipeline's and the release's ways to tokenise prompts and to take
image latents, :mod:`.engine` how its steps run (CUDA graphs, health flags, resume state) and
:mod:`.schedule` which concepts run when (cache, resume, batches sized to memory), :mod:`.report`
what the log says of a run (its cost, the concepts never stopped). The names below are the
stage's API.
"""

from ....errors import Stage1OutOfMemoryError
from ..config import FP16_LOSS_SCALE, Precision, Stage1Config, resolve_precision
from ..targets import ConceptTarget
from .latents import image_latents
from .objective import compute_z
from .schedule import cache_key_for, compute_targets, fitting_batch

__all__ = ["FP16_LOSS_SCALE", "ConceptTarget", "Precision", "Stage1Config", "Stage1OutOfMemoryError",
           "cache_key_for", "compute_targets", "compute_z", "fitting_batch", "image_latents",
           "resolve_precision"]
