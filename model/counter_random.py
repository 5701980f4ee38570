"""Counter-based random numbers with the same bits on every device (CPU, CUDA).

A stream is a 63-bit key. Element i of a stream owns `LANES` 32-bit words; word (i, lane) is a keyed hash
of the counter `LANES * i + lane`: two rounds of a multiply-xorshift bijection of 32-bit values, the key's
low half xored in before the first, its high half (with the counter's) before the second. The hash uses
only int64 shifts, xors, ands and products below 2^59 (a 32-bit value times a 27-bit constant), so nothing
overflows or rounds, and every device computes the same words. Floats are made from them exactly:
- `normal`: the Irwin-Hall sum of the 12 bytes of the element's words, centred, times 2^-8: mean 0,
  standard deviation sqrt(1 - 2^-16) (1 within 4e-6), values in steps of 2^-8 within +-5.98;
- `uniform`: the high 24 bits of the element's first word times 2^-24, in [0, 1);
- `words`: the first word itself, for integer uses (selection keys).
An element's value depends only on (key, i): a tensor drawn in chunks equals the tensor drawn whole.
"""

from __future__ import annotations

import torch

LANES = 3
_MASK32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B  # 27 bits: with a 32-bit value, the product stays below 2^59
_BYTE_PAIRS = 0x00FF00FF  # bytes 0 and 2 of a word, each in its own 16-bit lane
_BYTES_MEAN = 12 * 255 // 2  # 1530, exactly: the mean of a sum of 12 uniform bytes (127.5 each)


def _mix(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """A bijection of 32-bit values held in int64, in place (two multiply-xorshift rounds); `scratch` is
    a tensor like `x` to overwrite. (In-place operators: on the CPU, fresh tensors cost more than the work.)"""
    for _ in range(2):
        x ^= torch.bitwise_right_shift(x, 16, out=scratch)
        x *= _MULTIPLIER
        x &= _MASK32
    x ^= torch.bitwise_right_shift(x, 16, out=scratch)
    return x


def _hash(key: int, counters: torch.Tensor) -> torch.Tensor:
    """The 32-bit word (int64 in [0, 2^32)) of each non-negative int64 counter under `key`."""
    scratch = torch.empty_like(counters)
    x = torch.bitwise_and(counters, _MASK32)
    x ^= key & _MASK32
    _mix(x, scratch)
    x ^= torch.bitwise_right_shift(counters, 32, out=scratch)
    x ^= key >> 32
    return _mix(x, scratch)


def _check(key: int, first: int, count: int) -> None:
    if not 0 <= key < 2**63:
        raise ValueError(f"key: got {key}; allowed: 0 <= key < 2^63")
    if first < 0 or count < 0 or LANES * (first + count) > 2**62:
        raise ValueError(f"elements [{first}, {first + count}): allowed within [0, 2^62 / {LANES})")


def _counters(first: int, count: int, lanes: int, device: torch.device | str) -> torch.Tensor:
    """`[count, lanes]`: the counters `LANES * i + lane` of elements i in [first, first + count)."""
    elements = torch.arange(first, first + count, dtype=torch.int64, device=device).unsqueeze(-1) * LANES
    return elements + torch.arange(lanes, dtype=torch.int64, device=device)


def words(key: int, first: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The first word of elements [first, first + count) of stream `key`: int64 in [0, 2^32)."""
    _check(key, first, count)
    return _hash(key, _counters(first, count, 1, device)).view(count)


def uniform(key: int, first: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 values in [0, 1), multiples of 2^-24, of elements [first, first + count) of stream `key`."""
    return words(key, first, count, device).bitwise_right_shift_(8).to(torch.float32) * 2.0**-24


def normal(key: int, first: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Near-normal fp32 values (Irwin-Hall of 12 bytes, see the module doc) of elements [first, first + count)."""
    _check(key, first, count)
    lane_words = _hash(key, _counters(first, count, LANES, device))
    pairs = torch.bitwise_and(lane_words, _BYTE_PAIRS)  # bytes 0 and 2 of each word, in 16-bit lanes
    lane_words.bitwise_right_shift_(8)
    pairs += lane_words.bitwise_and_(_BYTE_PAIRS)  # plus bytes 1 and 3: lane 0 holds bytes 0+1, lane 1 bytes 2+3
    pair_sums = pairs.sum(dim=-1)  # at most 6 * 255 in a 16-bit lane: no carry between lanes
    total = torch.bitwise_right_shift(pair_sums, 16) + pair_sums.bitwise_and_(0xFFFF)
    return (total - _BYTES_MEAN).to(torch.float32) * 2.0**-8
