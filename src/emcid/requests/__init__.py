"""Requests: edit requests (:mod:`.edit`), debias requests (:mod:`.debias`), and request files
and lists, one loader for both kinds (:mod:`.files`)."""

from ..concepts import ARTIST_PROMPTS, OBJECT_PROMPTS
from ..core.generation import MAX_SEED
from ..core.tokens import subject_positions
from ..errors import QUOTE_LIMIT as PROMPT_QUOTE
from .debias import DebiasRequest, validate_debias_requests
from .edit import ERASE, LIST_SEPARATOR, EditRequest, validate_requests
from .files import (
    is_debias_batch,
    load_debias_requests,
    load_requests,
    parse_requests,
    save_requests,
)

__all__ = ["ARTIST_PROMPTS", "ERASE", "LIST_SEPARATOR", "MAX_SEED", "OBJECT_PROMPTS", "PROMPT_QUOTE",
           "DebiasRequest", "EditRequest", "is_debias_batch", "load_debias_requests", "load_requests",
           "parse_requests", "save_requests", "subject_positions", "validate_debias_requests",
           "validate_requests"]
