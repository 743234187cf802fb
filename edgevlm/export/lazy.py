"""A transformers model whose parameters stay on the meta device until a block is needed.

The exporter builds the model class from config.json with every *parameter* on ``meta`` (no
memory) and every *buffer* real (rotary frequencies, position ids: computed from the config,
tiny), then materialises one submodule at a time from the safetensors files and drops it again.
Peak memory is one block plus the calibration activations, whatever the number of layers.
Touching a module that was not loaded fails loudly ("meta tensor") instead of computing garbage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from .source import Source


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Register every new nn.Parameter on the meta device; buffers are left alone."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


class _Stop(Exception):
    """Raised by the input catcher to end a forward pass at the first block."""


class LazyModel:
    """The model skeleton plus load/release of submodules by canonical (module) name."""

    def __init__(self, source: Source) -> None:
        import transformers

        self.source = source
        config = transformers.AutoConfig.from_pretrained(source.path)
        cls = getattr(transformers, source.family.architecture)
        with _params_on_meta(), torch.no_grad():
            self.model = cls._from_config(config, dtype=torch.float32)
        self.model.eval()
        self.config = config
        self._ckpt = {source.family.canonical(k): k for k in source.locs}
        for e in source.family.entries:  # a tied LM head reads the token embeddings' tensor
            if e.tied_from is not None and e.src not in self._ckpt and e.tied_from in self._ckpt:
                self._ckpt[e.src] = self._ckpt[e.tied_from]

    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    def load(self, path: str, *, override: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Materialise every parameter under ``path`` from the checkpoint (or ``override``,
        canonical name -> tensor, e.g. already-quantized weights)."""
        mod = self.module(path)
        for name, p in list(mod.named_parameters()):
            full = f"{path}.{name}" if path else name
            if override and full in override:
                t = override[full]
            elif full in self._ckpt:
                t = torch.from_numpy(self.source.read(self._ckpt[full]))
            else:
                raise ValueError(f"parameter {full!r} of {self.source.family.architecture} is not in the "
                                 "checkpoint")
            if tuple(t.shape) != tuple(p.shape):
                t = t.reshape(p.shape)  # e.g. scalars stored as [1]
            self.set_param(full, t)
        return mod

    def release(self, path: str) -> None:
        """Put the parameters under ``path`` back on meta (frees their memory)."""
        mod = self.module(path)
        for name, p in list(mod.named_parameters()):
            self.set_param(f"{path}.{name}" if path else name, torch.empty(p.shape, device="meta"))

    def set_param(self, full: str, t: torch.Tensor) -> None:
        owner, _, leaf = full.rpartition(".")
        m = self.module(owner) if owner else self.model
        m._parameters[leaf] = nn.Parameter(t.to(torch.float32), requires_grad=False)

    def has(self, canonical: str) -> bool:
        return canonical in self._ckpt

    def read(self, canonical: str) -> np.ndarray:
        return self.source.read(self._ckpt[canonical])


def capture_block_inputs(run: Callable[[], Any], block: nn.Module) -> tuple[torch.Tensor, tuple, dict]:
    """Run ``run()`` until ``block`` is called; return (hidden_states, other args, kwargs) it got.

    This is GPTQ's "Catcher": the model's own forward builds the masks, position ids and rotary
    embeddings the blocks expect, so no family code re-derives them.
    """
    box: dict[str, Any] = {}

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        box["args"], box["kwargs"] = args, dict(kwargs)
        raise _Stop

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    except _Stop:
        pass
    finally:
        h.remove()
    if "args" not in box:
        raise RuntimeError("internal error: the model forward never reached its first block")
    args, kwargs = box["args"], box["kwargs"]
    if args:
        return args[0], tuple(args[1:]), kwargs
    return kwargs.pop("hidden_states"), (), kwargs


def call_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
