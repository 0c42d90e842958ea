"""Loads the compiled kernels (``anatomask_fast._C``) once, remembering why not."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import warnings
from types import ModuleType

# A build of the extension elsewhere than the package (scripts/sanitize.sh points it at
# the AddressSanitizer build, which must never replace the normal one).
EXTENSION_ENV = "ANATOMASK_EXTENSION"


def _import() -> ModuleType:
    path = os.environ.get(EXTENSION_ENV)
    if not path:
        return importlib.import_module("anatomask_fast._C")
    spec = importlib.util.spec_from_file_location("anatomask_fast._C", path)
    if spec is None or not os.path.isfile(path):
        raise ImportError(f"{EXTENSION_ENV}={path} is not an extension module file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["anatomask_fast._C"] = module
    return module


@functools.cache
def load() -> tuple[ModuleType | None, str]:
    """Returns ``(module, "")`` or ``(None, reason)``; warns once when it is missing.

    Importing the module registers the C++ operators with ``torch.ops.anatomask_fast``.
    """
    try:
        module = _import()
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
