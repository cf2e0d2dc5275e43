"""How Stage I tokenises prompts for the UNet's conditioning: the pipeline's way or the release's.

``"pipeline"`` (emcid's default): every prompt padded to the tokenizer's 77 tokens and
encoded without a mask, as the SD pipelines condition the UNet in use. ``"release"``: the
EMCID release pads one request's prompts to the longest of them and encodes them with the
attention mask (its source prompts and its destination prompts apart), so the UNet
cross-attends to those few tokens only.

A batch holds rows of several concepts, so here every row is padded to the batch's longest
prompt and the UNet gets a key mask that keeps each row to its own concept's length. The
states a row keeps are the release's: CLIP is causal, the extra padding is masked out of the
encoder's attention and positions are absolute, so a token's state does not depend on how
far the padding goes; and the masked keys get no attention weight in the UNet. A concept's
result therefore does not depend on the concepts beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ....core.bundle import ModelBundle, PromptEncoding


@dataclass
class Tokens:
    """Token ids per text encoder, with their attention masks and the UNet's key mask."""

    ids: list[torch.Tensor]
    masks: list[torch.Tensor] | None  # per encoder; None: encoded without a mask
    keys: torch.Tensor | None  # (rows, tokens), True where the UNet may attend; None: everywhere

    def encode(self, bundle: ModelBundle) -> PromptEncoding:
        return bundle.encode_ids(self.ids, self.masks)


def concept_keys(masks: list[torch.Tensor], owner: torch.Tensor) -> torch.Tensor:
    """(rows, tokens): True before the length of the longest prompt of each row's concept, as
    far as the release pads that concept's prompts."""
    lengths = torch.stack([mask.sum(1) for mask in masks]).amax(0).cpu()
    longest = torch.zeros(int(owner.max()) + 1, dtype=lengths.dtype)
    longest = longest.scatter_reduce(0, owner, lengths, "amax")
    keys = torch.arange(masks[0].shape[1]) < longest[owner].unsqueeze(1)
    return keys.to(masks[0].device)


def prompt_tokens(bundle: ModelBundle, conditioning: str, prompts: list[str],
                  owner: torch.Tensor) -> Tokens:
    """``prompts`` (one per row, ``owner``: each row's concept) tokenised for ``conditioning``."""
    if conditioning == "pipeline":
        return Tokens(bundle.tokenize(prompts), None, None)
    slots = bundle.slots()
    # To the longest prompt of the batch (under every tokenizer, so SDXL's two encoders' states
    # line up), each tokenizer with its own pad token, as the release pads.
    longest = max(len(row) for slot in slots for row in slot.tokenizer(prompts, truncation=True).input_ids)
    ids, masks = [], []
    for slot in slots:
        out = slot.tokenizer(prompts, padding="max_length", max_length=longest, truncation=True,
                             return_tensors="pt")
        ids.append(out.input_ids.to(slot.encoder.device))
        masks.append(out.attention_mask.to(slot.encoder.device))
    return Tokens(ids, masks, concept_keys(masks, owner))


@dataclass
class TextRows:
    """The rows Stage I's text pass runs on: each concept's prompts once. A concept's images
    repeat its prompts (more so with both sides' images), and a prompt's edited states do not
    depend on the image, so every other row takes its prompt's encoding (``spread``)."""

    ids: list[torch.Tensor]
    masks: list[torch.Tensor] | None
    prefix: dict[str, torch.Tensor]  # block l*'s unedited output at every token, per text encoder
    positions: dict[str, torch.Tensor]  # the subject token, per text encoder
    owner: torch.Tensor  # each text row's concept
    expand: torch.Tensor | None  # per batch row, its text row; None where they are the same rows

    def spread(self, encoding: PromptEncoding) -> PromptEncoding:
        """Every batch row's encoding, from its text row's."""
        if self.expand is None:
            return encoding

        def rows(states: torch.Tensor | None) -> torch.Tensor | None:
            return None if states is None else states.index_select(0, self.expand)

        return PromptEncoding(rows(encoding.embeds), [rows(p) for p in encoding.pooled],
                              rows(encoding.added_text_embeds))
