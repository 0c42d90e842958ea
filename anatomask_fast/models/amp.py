"""Helpers of the hand-written backward passes. Autocast: a backward that recomputes
part of its forward must compute it in the forward's precision, and autograd does not
restore the forward's autocast state (``torch.amp.custom_bwd`` does, but fixes the
device type at definition); a backward that runs one sample at a time sums its
half-precision parameter gradients in fp32. Memory format: the decoder runs
channels-last on CPU, and its gradients keep the format of what they belong to."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AutocastState:
    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def current(cls, device: torch.device) -> AutocastState:
        return cls(
            device.type,
            torch.is_autocast_enabled(device.type),
            torch.get_autocast_dtype(device.type),
        )

    def restored(self) -> contextlib.AbstractContextManager:
        """This state, for the block (autocast off when it was off)."""
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


def accumulate_fp32(total: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor:
    """``total + grad`` for per-sample parameter gradients, summed in at least fp32
    (they are half precision under autocast)."""
    grad = grad.to(torch.promote_types(grad.dtype, torch.float32))
    return grad if total is None else total.add_(grad)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The dense memory format ``t`` is in. An incoming gradient made plain-contiguous
    when its tensor is channels-last would be a full copy (and every convolution
    backward would reorder between the two formats)."""
    channels_last = t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()
    return torch.channels_last_3d if channels_last else torch.contiguous_format
