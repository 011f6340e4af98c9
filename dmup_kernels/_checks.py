"""Argument validation shared by the public functions and modules.

Every check raises TypeError (wrong kind of value) or ValueError (right kind, wrong value) with a
message that names the argument and says what was expected.
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor

from .reference import ACTIVATIONS, BLOCKS


def check_tensor(value: object, name: str) -> Tensor:
    """A floating-point tensor (float16/bfloat16/float32/float64)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {value.dtype}")
    return value


def check_like(value: Tensor, name: str, like: Tensor, like_name: str) -> None:
    """``value`` has the dtype and device of ``like``."""
    if value.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of {like_name} ({like.dtype}); got {value.dtype}")
    if value.device != like.device:
        raise ValueError(f"{name} must be on the device of {like_name} ({like.device}); got {value.device}")


def check_shape(value: Tensor, name: str, expected: Sequence[int]) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}; got {tuple(value.shape)}")


def check_width(x: Tensor, name: str, width: int) -> None:
    """``x`` is a floating-point tensor of shape (..., width)."""
    check_tensor(x, name)
    if x.dim() < 1 or x.shape[-1] != width:
        raise ValueError(f"{name} must have shape (..., {width}) (last dim = width); got {tuple(x.shape)}")


def check_scale(scale: object, name: str = "scale") -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name} must be a real number; got {type(scale).__name__} {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"{name} must be finite; got {scale}")
    return float(scale)


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
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


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1; got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value}")
    return value

