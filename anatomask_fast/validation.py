"""Argument checks shared by the public ops: each error names the op, the argument,
what was expected and what came."""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(
    op: str,
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{op}: argument '{name}' must be a torch.Tensor, got {type(value).__name__}"
        )
    if ndim is not None and value.dim() != ndim:
        raise ValueError(
            f"{op}: argument '{name}' must be {ndim}-D, got shape {tuple(value.shape)}"
        )
    if dtypes is not None and value.dtype not in dtypes:
        expected = ", ".join(str(d) for d in dtypes)
        raise TypeError(
            f"{op}: argument '{name}' must have dtype in ({expected}), got {value.dtype}"
        )
    return value


def check_eps(op: str, eps: object) -> float:
    """A finite epsilon > 0 (eps <= 0 turns a zero variance into NaN or Inf)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{op}: argument 'eps' must be a real number, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{op}: argument 'eps' must be positive and finite, got {eps}")
    return float(eps)


def check_volume(op: str, name: str, value: object) -> torch.Tensor:
    """A float (B, C, H, W, D) volume or feature map."""
    return check_tensor(op, name, value, ndim=5, dtypes=FLOAT_DTYPES)


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    (first_name, first), *rest = tensors.items()
    for name, tensor in rest:
        if tensor.device != first.device:
            raise ValueError(
                f"{op}: argument '{name}' is on {tensor.device}, expected "
                f"{first.device} like '{first_name}'"
            )


def check_active_mask(
    op: str, active: object, like: torch.Tensor, *, name: str = "active", like_name: str = "x"
) -> tuple[int, int, int]:
    """A bool visible mask (B, 1, h, w, d) whose grid divides ``like``'s spatial shape;
    returns the cell size (ph, pw, pd) at ``like``'s resolution."""
    check_tensor(op, name, active)
    if active.dtype != torch.bool:
        raise TypeError(
            f"{op}: argument '{name}' must be a bool tensor (True = visible), "
            f"got dtype {active.dtype}"
        )
    batch = like.shape[0]
    if active.dim() != 5 or active.shape[0] != batch or active.shape[1] != 1:
        raise ValueError(
            f"{op}: argument '{name}' must have shape ({batch}, 1, h, w, d), "
            f"got {tuple(active.shape)}"
        )
    grid, spatial = tuple(active.shape[2:]), tuple(like.shape[2:])
    if any(g <= 0 or s % g for g, s in zip(grid, spatial)):
        raise ValueError(
            f"{op}: the grid {grid} of '{name}' must divide the spatial shape "
            f"{spatial} of '{like_name}'"
        )
    check_same_device(op, **{like_name: like, name: active})
    return tuple(s // g for g, s in zip(grid, spatial))


def data_known(*tensors: torch.Tensor) -> bool:
    """Whether the values of ``tensors`` can be read: not while torch.compile traces,
    nor for fake or meta tensors (shape propagation, ``opcheck``'s fake-tensor test);
    data-dependent checks are skipped there (the kernels check when they run)."""
    if torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not any(is_fake(t) or t.device.type == "meta" for t in tensors)


def require(ok: torch.Tensor, message: str) -> None:
    """A data-dependent check: a ValueError for CPU tensors; on other devices a
    device-side assertion (a host-side check would synchronize). Skipped where the
    data is not known (:func:`data_known`)."""
    if not data_known(ok):
        return
    if ok.device.type == "cpu":
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


def check_index_values(
    op: str, name: str, ids: torch.Tensor, low: int, high: int, what: str
) -> None:
    """Every value of ``ids`` in [low, high); ``what`` says what they index (the
    message is the C++ kernels' one)."""
    if ids.numel() == 0 or not data_known(ids):
        return
    expected = f"{op}: argument '{name}' must hold indices in [{low}, {high}) of {what}"
    if ids.device.type != "cpu":
        require(((ids >= low) & (ids < high)).all(), expected)
        return
    smallest, largest = (int(v) for v in torch.aminmax(ids))
    if smallest < low:
        raise ValueError(f"{expected}; got a minimum of {smallest}")
    if largest >= high:
        raise ValueError(f"{expected}; got a maximum of {largest}")


def register_fake(qualname: str) -> Callable[[Callable], Callable]:
    """``torch.library.register_fake`` whose kernel first checks that every tensor
    argument is on one device: the fake (meta) kernel is what runs when a meta tensor
    meets real ones, and it must refuse the mix as the real kernels do."""
    op = qualname.split("::")[-1]

    def register(fake: Callable) -> Callable:
        names = list(inspect.signature(fake).parameters)

        @functools.wraps(fake)
        def checked(*args, **kwargs):
            tensors = [
                (name, value) for name, value in zip(names, args) if isinstance(value, torch.Tensor)
            ]
            for name, value in tensors[1:]:
                if value.device != tensors[0][1].device:
                    raise ValueError(
                        f"{op}: argument '{name}' is on {value.device}, expected "
                        f"{tensors[0][1].device} like '{tensors[0][0]}'"
                    )
            return fake(*args, **kwargs)

        return torch.library.register_fake(qualname)(checked)

    return register
