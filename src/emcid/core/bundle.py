"""A loaded pipeline and what the editors need of it.

A :class:`ModelBundle` keeps diffusers' own component names (``tokenizer``, ``text_encoder``,
``tokenizer_2``, ``text_encoder_2``, ``unet``, ``vae``, ``scheduler``) and adds the family,
a content fingerprint, prompt encoding exactly as the family's pipeline does it, the names of
the editable ``fc2`` modules, and the chain of patches it carries (:mod:`emcid.core.chain`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .chain import PatchChain
from .family import BLOCK_TEMPLATE, COMPONENTS, FC2_TEMPLATE
from .fingerprint import cached_fingerprint


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """Resolve a checkpoint-style name (``text_model.encoder...``) on any transformers version.

    transformers 5 dropped the ``text_model`` wrapper inside ``CLIPTextModel``; checkpoints and
    our patches keep the original names, so both spellings resolve.
    """
    try:
        return model.get_submodule(path)
    except AttributeError:
        prefix = "text_model."
        alternative = path[len(prefix):] if path.startswith(prefix) else prefix + path
        return model.get_submodule(alternative)


@dataclass
class TextEncoderSlot:
    """One tokenizer + text encoder pair, named as in the pipeline (``text_encoder[_2]``)."""

    name: str
    tokenizer: object
    encoder: nn.Module

    @property
    def num_layers(self) -> int:
        return self.encoder.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    def block(self, layer: int) -> nn.Module:
        return get_submodule(self.encoder, BLOCK_TEMPLATE.format(layer))

    def fc2(self, layer: int) -> nn.Linear:
        return get_submodule(self.encoder, FC2_TEMPLATE.format(layer))

    def fc2_name(self, layer: int) -> str:
        """Module name relative to the pipeline, as patches and statistics store it."""
        return f"{self.name}.{FC2_TEMPLATE.format(layer)}"

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids padded to the tokenizer's full length, as the SD pipelines do."""
        return self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.encoder.device)


@dataclass
class PromptEncoding:
    """What the UNet is conditioned on, plus what the text alignment loss compares."""

    embeds: torch.Tensor
    pooled: list[torch.Tensor]
    added_text_embeds: torch.Tensor | None = None


@dataclass
class ModelBundle:
    """A loaded pipeline with its family, source and generation defaults."""

    pipeline: object
    family: str
    source: str
    sampling: dict
    settings: dict = field(default_factory=dict)
    chain: PatchChain = field(default_factory=PatchChain)
    # components -> (weights_state, fingerprint): see emcid.core.fingerprint
    fingerprints: dict = field(default_factory=dict, repr=False, compare=False)

    def __getattr__(self, name: str):
        # Component names are diffusers' own: bundle.unet, bundle.text_encoder_2, ...
        if name in ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "unet", "vae",
                    "scheduler"):
            return getattr(self.pipeline, name, None)
        raise AttributeError(name)

    @property
    def history(self) -> list[dict]:
        """The patches recorded in the folder this model was loaded from (oldest first)."""
        return self.chain.history

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def is_embedded(self) -> bool:
        """True for the project's own miniature model (it carries its own world)."""
        return self.settings.get("world") == "mini"

    def slots(self) -> list[TextEncoderSlot]:
        slots = [TextEncoderSlot("text_encoder", self.tokenizer, self.text_encoder)]
        if self.family == "sdxl":
            slots.append(TextEncoderSlot("text_encoder_2", self.tokenizer_2, self.text_encoder_2))
        return slots

    def slot(self, name: str) -> TextEncoderSlot:
        for slot in self.slots():
            if slot.name == name:
                return slot
        raise KeyError(f"this {self.family} model has no component {name!r}")

    def module(self, name: str) -> nn.Module:
        component, _, rest = name.partition(".")
        return get_submodule(getattr(self.pipeline, component), rest)

    def fingerprint(self, components: tuple[str, ...] = COMPONENTS) -> str:
        """The content hash of the model as it is now (recomputed only after weights change)."""
        return cached_fingerprint(self, tuple(components))

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids of ``prompts`` for each text encoder, in ``slots()`` order."""
        return [slot.tokenize(prompts) for slot in self.slots()]

    def encode(self, prompts: list[str]) -> PromptEncoding:
        """Encode prompts exactly as the family's diffusers pipeline does (gradients kept)."""
        return self.encode_ids(self.tokenize(prompts))

    def encode_ids(self, ids: list[torch.Tensor],
                   masks: list[torch.Tensor] | None = None) -> PromptEncoding:
        """``encode`` from ``tokenize``'s ids: a loop that encodes the same prompts many times
        (Stage I) tokenises them once. ``masks``: attention masks per encoder (None: none, as
        the pipelines encode; the EMCID release's Stage I gives them)."""
        masks = masks or [None] * len(ids)
        if self.family != "sdxl":
            out = self.text_encoder(ids[0], attention_mask=masks[0])
            return PromptEncoding(out.last_hidden_state, [out.pooler_output])
        states, pooled = [], []
        for slot, slot_ids, mask in zip(self.slots(), ids, masks, strict=True):
            out = slot.encoder(slot_ids, attention_mask=mask, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            # CLIPTextModelWithProjection returns its projected pooled state as text_embeds.
            projected = getattr(out, "text_embeds", None)
            pooled.append(projected if projected is not None else out.pooler_output)
        return PromptEncoding(torch.cat(states, dim=-1), pooled, projected)

    def unet_kwargs(self, encoding: PromptEncoding, height: int, width: int) -> dict:
        """Extra UNet inputs: SDXL's pooled text embedding and size/crop conditioning."""
        if self.family != "sdxl":
            return {}
        batch = encoding.embeds.shape[0]
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=encoding.embeds.dtype)
        return {
            "added_cond_kwargs": {
                "text_embeds": encoding.added_text_embeds,
                "time_ids": time_ids.to(encoding.embeds.device).repeat(batch, 1),
            }
        }

    def latent_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)
