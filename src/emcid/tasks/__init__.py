"""Tasks: an edit (:mod:`.edit`, the patch and its metadata), erase (:mod:`.erase`, written as
edit requests) and debias (:mod:`.debias`). Erase's names are re-exported here (as the old
``emcid.tasks`` module had them); import the others from their modules."""

from ..requests.edit import ERASE
from .erase import generic_destination, is_erase, resolve_erase

__all__ = ["ERASE", "generic_destination", "is_erase", "resolve_erase"]
