"""Argument validation shared by the public functions and modules.

Every check raises TypeError (wrong kind of value) or ValueError (right kind, wrong value) with a
message that names the argument and says what was expected.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from .reference import ACTIVATIONS, BLOCKS


def check_tensor(value: object, name: str) -> Tensor:
    """A floating-point tensor (float16/bfloat16/float32/float64)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {value.dtype}")
    return value


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know, such as "meta"
        return False


def check_like(value: Tensor, name: str, like: Tensor, like_name: str, *, autocast: bool = False) -> None:
    """``value`` has the dtype and device of ``like``; with ``autocast``, floating dtypes may differ while
    autocast is on for the device (as they do between autocast's bfloat16 outputs and float32 weights)."""
    if value.dtype != like.dtype and not (autocast and _autocast_enabled(like.device.type)):
        raise TypeError(f"{name} must have the dtype of {like_name} ({like.dtype}); got {value.dtype}")
    if value.device != like.device:
        raise ValueError(f"{name} must be on the device of {like_name} ({like.device}); got {value.device}")


def check_shape(value: Tensor, name: str, expected: Sequence[int]) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}; got {tuple(value.shape)}")


def check_width(x: Tensor, name: str, width: int, width_name: str = "width") -> None:
    """``x`` is a floating-point tensor of shape (..., width); ``width_name`` says what the width is."""
    check_tensor(x, name)
    if x.dim() < 1 or x.shape[-1] != width:
        raise ValueError(f"{name} must have shape (..., {width}) (last dim = {width_name}); got {tuple(x.shape)}")


def is_finite(value: numbers.Real) -> bool:
    """Whether the real number ``value`` is finite. A comparison rather than ``math.isfinite``: under
    ``torch.compile(dynamic=True)`` numbers such as a module's branch scale arrive as symbolic floats,
    which compare (a guard) but do not go through ``math.isfinite``."""
    return abs(value) < math.inf


def check_finite_real(value: object, name: str) -> float:
    """A finite real number (int, float or a numpy scalar; not bool), returned as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    if not is_finite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    try:
        return float(value)
    except OverflowError:  # an int past the float range
        raise ValueError(f"{name} must be finite as a float; got an int of {len(str(abs(value)))} digits") from None


def check_non_negative(value: object, name: str) -> float:
    """A finite real number >= 0, returned as a float."""
    number = check_finite_real(value, name)
    if number < 0:
        raise ValueError(f"{name} must be >= 0; got {number}")
    return number


def check_scale(scale: object) -> float:
    """The branch multiplier: a finite real number."""
    return check_finite_real(scale, "scale")


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {tuple(choices)}; got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}")
    return value  # type: ignore[return-value]


def check_activation(value: object) -> str:
    return check_choice(value, "activation", tuple(ACTIVATIONS))


def check_block(value: object) -> str:
    return check_choice(value, "block", BLOCKS)


def check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__} {value!r}")
    return value


def check_float_dtype(value: object, name: str) -> None:
    """None (torch's default dtype) or a floating-point torch.dtype."""
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise TypeError(f"{name} must be a floating-point torch.dtype or None; got {value!r}")


def check_positive_int(value: object, name: str) -> int:
    """An integer >= 1 (int or a numpy integer; not bool), returned as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1; got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value}")
    return int(value)


def check_checkpoint(value: object) -> int | str | None:
    """None (save every layer), an int k >= 1 (keep the stream state every k layers), or "sqrt"."""
    if value is None or (isinstance(value, str) and value == "sqrt"):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f'checkpoint must be None, an int >= 1 or "sqrt"; got {type(value).__name__} {value!r}')
    if value < 1:
        raise ValueError(f'checkpoint must be None, an int >= 1 or "sqrt"; got {value}')
    return int(value)


def checkpoint_every(checkpoint: int | str | None, depth: int) -> int:
    """The layers per checkpoint of a stack of ``depth`` layers: 0 for None (save every layer), k for
    an int, ceil(sqrt(depth)) for "sqrt"."""
    if checkpoint is None:
        return 0
    return math.isqrt(depth - 1) + 1 if checkpoint == "sqrt" else checkpoint
