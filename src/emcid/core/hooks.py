"""One small utility to read or add to activations at token positions.

Every stage of the method touches the text encoder the same way: it reads a module's input
or output at the subject token of each prompt, or adds a vector there, and may end the
forward pass once the last block it needs has run (:func:`stop_after`, as AlphaEdit's
``Trace(..., stop=True)``). Forward hooks do all of it without forking model code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _main_tensor(output: torch.Tensor | tuple) -> torch.Tensor:
    """Transformer blocks return a tensor (transformers 5) or a tuple whose head is one."""
    return output[0] if isinstance(output, tuple) else output


def _replace_main(output: torch.Tensor | tuple, new: torch.Tensor) -> torch.Tensor | tuple:
    return (new, *output[1:]) if isinstance(output, tuple) else new


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows ``hidden[b, positions[b]]`` for every batch item ``b``: shape (batch, width)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, positions.to(hidden.device)]


@contextmanager
def add_at_positions(
    module: nn.Module, positions: torch.Tensor, vectors: torch.Tensor
) -> Iterator[None]:
    """Add ``vectors`` (width or batch x width) to ``module``'s output at one token per row.

    Out of place, so gradients flow into ``vectors`` (Stage I optimises them this way).
    """

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor | tuple):
        hidden = _main_tensor(output)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        values = vectors.to(hidden.dtype).expand(hidden.shape[0], hidden.shape[-1])
        bumped = hidden.index_put((rows, positions.to(hidden.device)), values, accumulate=True)
        return _replace_main(output, bumped)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capture(
    modules: dict[str, nn.Module], positions: torch.Tensor | None = None, what: str = "output"
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record each module's input or output per forward call: at one token per row
    (``positions``; (batch, width) tensors) or whole (``positions=None``, detached).

    Yields a dict name -> list of tensors, one per forward pass.
    """
    if what not in ("input", "output"):
        raise ValueError(f"what must be 'input' or 'output', not {what!r}")
    records: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    handles = []
    for name, module in modules.items():

        def hook(_module, inputs, output, name=name):
            hidden = inputs[0] if what == "input" else _main_tensor(output)
            records[name].append(hidden.detach() if positions is None
                                 else gather_positions(hidden, positions))

        handles.append(module.register_forward_hook(hook))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def replay_prefix(blocks: list[nn.Module], output: torch.Tensor) -> Iterator[None]:
    """Skip ``blocks`` (the first blocks of an encoder, in order): the last returns ``output``.

    Stage I reruns the encoder hundreds of times while only what follows the edited block
    changes; replaying that block's recorded output saves the prefix's forward and backward
    passes. Blocks before the last pass their input through, so only hidden states from the
    last replayed block on are meaningful (every pipeline reads them from there).
    """

    def passthrough(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states

    def replayed(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return output.to(hidden_states.dtype)

    # A forward set on the instance (accelerate's offloading hooks do this) is put back after.
    own = [block.__dict__.get("forward") for block in blocks]
    for block in blocks[:-1]:
        block.forward = passthrough
    blocks[-1].forward = replayed
    try:
        yield
    finally:
        for block, forward in zip(blocks, own, strict=True):
            if forward is None:
                del block.forward  # the class's forward again
            else:
                block.forward = forward


class StopForward(Exception):
    """Raised by :func:`stop_after`'s hook to end a forward pass; caught by :func:`stop_after`."""


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """End the forward pass inside the block once ``module`` has run (its output is not
    returned: read it with :func:`capture` entered before this). Hooks registered before this
    one on ``module`` still run."""

    def hook(*_args) -> None:
        raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    except StopForward:
        pass
    finally:
        handle.remove()
