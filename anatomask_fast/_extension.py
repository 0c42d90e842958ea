"""Loads the compiled kernels (``anatomask_fast._C``) once, remembering why not."""
from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType


@functools.lru_cache(maxsize=None)
def load() -> tuple[ModuleType | None, str]:
    """Returns ``(module, "")`` or ``(None, reason)``; warns once when it is missing.

    Importing the module registers the C++ operators with ``torch.ops.anatomask_fast``.
    """
    try:
        module = importlib.import_module("anatomask_fast._C")
    except ImportError as error:
        reason = f"the C++ extension anatomask_fast._C is not built ({error})"
        warnings.warn(
            f"anatomask_fast: {reason}; CPU ops fall back to the PyTorch reference. "
            "Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None, reason
    return module, ""


def cuda_kernels_built() -> bool:
    module, _ = load()
    return module is not None and module.cuda_kernels_built()
