"""Which errors of a batch are the device's, not an image's.

An image can break generation (a text that trips the parser, a shape no kernel takes): splitting the
batch finds it, and it fails alone. The device's own errors are another kind. A CUDA out-of-memory error
depends on the batch's size: halving it helps. A kernel that cannot compile or launch, an illegal memory
access, a device-side assert or a lost GPU fails every batch the same way — and a CUDA error leaves the
device's context unusable — so splitting a 64-image batch until one image is "guilty" would only spend
127 attempts, on every batch, before the first line is written: such an error stops the run. Imports no
torch.
"""

from __future__ import annotations

import re

from .checkpoint import first_line

# What CUDA, its libraries and Triton's launcher say when the device, not the data, failed.
_DEVICE_MESSAGES = re.compile(
    r"CUDA error|CUDA driver error|Triton Error \[CUDA\]|CUBLAS_STATUS_|CUDNN_STATUS_|cuDNN error|"
    r"device-side assert|illegal memory access|unspecified launch failure|no kernel image is available"
)


class DeviceFailure(Exception):
    """The device or its kernels failed, whatever the images: the run stops (its message is one line)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the device running out of memory (a smaller batch may fit)."""
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


def device_failure(exc: BaseException) -> str | None:
    """One line naming the device's error behind ``exc`` (or an error it was raised from), or ``None``
    when ``exc`` may be one image's doing. Out-of-memory errors are not device failures here."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if not is_out_of_memory(error) and _is_device_error(error):
            return describe(error)
        error = error.__cause__ or error.__context__
    return None


def describe(error: BaseException) -> str:
    """``error`` as one line: its type and what it says."""
    # A Triton compile error's first line is where it happened; its own message says what.
    return f"{type(error).__name__}: {getattr(error, 'error_message', None) or first_line(error)}"


def _is_device_error(error: BaseException) -> bool:
    # Every Triton error (compilation, out of resources, PTX assembly, autotuning) is the kernel's.
    if any(kind.__module__.split(".")[0] == "triton" for kind in type(error).__mro__):
        return True
    if type(error).__name__ == "AcceleratorError":  # torch's CUDA errors (not out of memory)
        return True
    return isinstance(error, RuntimeError) and bool(_DEVICE_MESSAGES.search(str(error)))
