"""What the fused stacks save for the derivative of phi, shared by the C++ and Triton ops' rules
(docs/design.md §4)."""

MASK_WORD_BITS = 16
"""Rows per word of the saved sign bits: mask tensors are int16, bit r % 16 of word r // 16 is row r."""


def mask_words(batch: int) -> int:
    """Words per feature and plane of the saved sign bits for ``batch`` rows: ceil(batch / 16)."""
    return (batch + MASK_WORD_BITS - 1) // MASK_WORD_BITS


def sign_planes(activation: str, block: str) -> int:
    """Sign-bit planes saved per element of a "post" block: relu keeps [not h <= 0] (torch's relu
    gradient passes where h is NaN), abs keeps [h > 0] and [h < 0]; the "pre" block and the smooth
    activations keep none."""
    return {"relu": 1, "abs": 2}.get(activation, 0) if block == "post" else 0
