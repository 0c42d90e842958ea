"""Argument checks shared by the public ops: each error names the op, the argument,
what was expected and what came."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(op: str, name: str, value: object, *, ndim: int | None = None,
                 dtypes: tuple[torch.dtype, ...] | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{op}: argument '{name}' must be {ndim}-D, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        expected = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{op}: argument '{name}' must have dtype in ({expected}), got {value.dtype}")
    return value


def check_volume(op: str, name: str, value: object) -> torch.Tensor:
    """A float (B, C, H, W, D) volume or feature map."""
    return check_tensor(op, name, value, ndim=5, dtypes=FLOAT_DTYPES)


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    (first_name, first), *rest = tensors.items()
    for name, tensor in rest:
        if tensor.device != first.device:
            raise ValueError(f"{op}: argument '{name}' is on {tensor.device}, expected "
                             f"{first.device} like '{first_name}'")


def check_active_mask(op: str, active: object, like: torch.Tensor, *,
                      name: str = "active", like_name: str = "x") -> tuple[int, int, int]:
    """A bool visible mask (B, 1, h, w, d) whose grid divides ``like``'s spatial shape;
    returns the cell size (ph, pw, pd) at ``like``'s resolution."""
    check_tensor(op, name, active)
    if active.dtype != torch.bool:
        raise TypeError(f"{op}: argument '{name}' must be a bool tensor (True = visible), "
                        f"got dtype {active.dtype}")
    batch = like.shape[0]
    if active.dim() != 5 or active.shape[0] != batch or active.shape[1] != 1:
        raise ValueError(f"{op}: argument '{name}' must have shape ({batch}, 1, h, w, d), "
                         f"got {tuple(active.shape)}")
    grid, spatial = tuple(active.shape[2:]), tuple(like.shape[2:])
    if any(g <= 0 or s % g for g, s in zip(grid, spatial)):
        raise ValueError(f"{op}: the grid {grid} of '{name}' must divide the spatial shape "
                         f"{spatial} of '{like_name}'")
    check_same_device(op, **{like_name: like, name: active})
    return tuple(s // g for g, s in zip(grid, spatial))
