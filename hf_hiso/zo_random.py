"""A counter-based direction generator: the same numbers on every device and for any thread count.

Number `j` of a direction stream with 64-bit key `k` comes from the SplitMix64 output for the counter `c = j // L`:

    h_c = mix64(k + (c + 1) * gamma  mod 2**64),   gamma = 0x9E3779B97F4A7C15
    mix64(x): x ^= x >> 30; x *= 0xBF58476D1CE4E5B9; x ^= x >> 27; x *= 0x94D049BB133111EB; x ^= x >> 31

(output `c` of the SplitMix64 generator seeded with `k`), and its lane `j mod L` (lane `l` = bits `b*l` to
`b*l + b - 1`):

* `"gaussian"` (`L = 4`, 16-bit lanes): `z = T[lane]` with `T` the 65,536 midpoint quantiles of `N(0, 1)`,
  `T[i] = Phi^-1((i + 1/2) / 2**16) / s`, `s` chosen so that the table's mean square is 1. Moments of `z`: mean 0
  exactly (the table is symmetric), second moment 1 (to float32 rounding), fourth moment 2.9992 (3 for a true
  Gaussian: the tails are cut at |z| <= 4.33), odd moments 0. Coordinates are independent, so `E[z z^T] = I`, which
  is all a zeroth-order estimator needs.
* `"rademacher"` (`L = 8`, 8-bit lanes): `z = +1` if the lane's top bit is 0, `-1` otherwise. Mean 0, `z**2 = 1`.

Only 64-bit integer arithmetic and a table lookup are involved, computed with torch ops on the output's own device:
no floating-point rounding differs between a CPU and an accelerator, and every op is elementwise, so the numbers do
not depend on the number of threads. The table is built once in float64 on the CPU and copied to each device.
Work is done in chunks of `CHUNK` counters (1 M numbers): few enough torch calls per number that thread barriers do
not dominate on a busy machine, small enough that the temporaries (8 MiB) stay in the CPU's last-level cache.
"""

from __future__ import annotations

import sys

import torch

DISTRIBUTIONS = ("gaussian", "rademacher")
LANES = {"gaussian": 4, "rademacher": 8}
CHUNK = 1 << 18

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB

_tables: dict[torch.device, torch.Tensor] = {}
_counters: dict[torch.device, torch.Tensor] = {}


def _signed(x: int) -> int:
    """The int64 value with the bits of `x mod 2**64` (torch has no full uint64 arithmetic)."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def splitmix64(x: int) -> int:
    """`mix64(x + gamma)`: a well-mixed 64-bit hash (the first SplitMix64 output of state `x`)."""
    x = (x + _GAMMA) & _MASK64
    x = ((x ^ (x >> 30)) * _M1) & _MASK64
    x = ((x ^ (x >> 27)) * _M2) & _MASK64
    return x ^ (x >> 31)


def gaussian_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 65,536-entry float32 quantile table `T` of the `"gaussian"` distribution, on `device`."""
    device = torch.device(device)
    table = _tables.get(device)
    if table is None:
        if device.type != "cpu":
            table = gaussian_table("cpu").to(device)
        else:
            # The positive half, mirrored, so that the table is exactly symmetric (mean exactly 0).
            half = torch.special.ndtri((torch.arange(1 << 15, dtype=torch.float64) + 0.5 + (1 << 15)) / (1 << 16))
            full = torch.cat([-half.flip(0), half])
            table = (full / full.square().mean().sqrt()).float()
        _tables[device] = table
    return table


def _counter_base(device: torch.device) -> torch.Tensor:
    base = _counters.get(device)
    if base is None or base.numel() < CHUNK:
        base = _counters[device] = torch.arange(CHUNK, dtype=torch.int64, device=device).mul_(_signed(_GAMMA))
    return base


def _xorshift_(z: torch.Tensor, tmp: torch.Tensor, shift: int) -> None:
    # z ^= z >> shift, with a logical shift: torch's `>>` on int64 is arithmetic, so the sign bits are masked off.
    torch.bitwise_right_shift(z, shift, out=tmp)
    tmp.bitwise_and_((1 << (64 - shift)) - 1)
    z.bitwise_xor_(tmp)


def hash_counters(key: int, first: int, count: int, device: torch.device, out: torch.Tensor | None = None):
    """`h_c` for counters `c = first .. first + count - 1` (`count <= CHUNK`), as int64 bit patterns."""
    z = torch.empty(count, dtype=torch.int64, device=device) if out is None else out[:count]
    torch.add(_counter_base(device)[:count], _signed(key + (first + 1) * _GAMMA), out=z)
    tmp = torch.empty_like(z)
    _xorshift_(z, tmp, 30)
    z.mul_(_signed(_M1))
    _xorshift_(z, tmp, 27)
    z.mul_(_signed(_M2))
    _xorshift_(z, tmp, 31)
    return z


def fill_(out: torch.Tensor, key: int, start: int = 0, distribution: str = "gaussian") -> torch.Tensor:
    """Writes numbers `start .. start + out.numel() - 1` of the stream with key `key` into `out` (a contiguous float32
    tensor on any device) and returns it."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("fill_ needs a contiguous float32 tensor")
    # Lanes are read through a dtype view of the int64 hashes, which is bit order on little-endian hosts (all
    # platforms torch supports today).
    assert sys.byteorder == "little", "the counter generator reads lanes as little-endian"
    flat = out.view(-1)
    n, lanes, device = flat.numel(), LANES[distribution], out.device
    first, skip = divmod(int(start), lanes)
    total = (skip + n + lanes - 1) // lanes
    table = gaussian_table(device) if distribution == "gaussian" else None
    words = torch.empty(min(CHUNK, total), dtype=torch.int64, device=device)
    pos = 0  # next position of `flat` to write
    for c0 in range(0, total, CHUNK):
        m = min(CHUNK, total - c0)
        h = hash_counters(key, first + c0, m, device, out=words)
        lo = skip if c0 == 0 else 0
        take = min(m * lanes - lo, n - pos)
        dst = flat[pos : pos + take]
        if table is not None:
            idx = h.view(torch.int16)[lo : lo + take].to(torch.int32).bitwise_and_(0xFFFF)
            torch.index_select(table, 0, idx, out=dst)
        else:
            # int8 lane >> 7 is 0 or -1 (arithmetic shift); | 1 maps it to +1 or -1.
            dst.copy_(h.view(torch.int8)[lo : lo + take].bitwise_right_shift(7).bitwise_or_(1))
        pos += take
    return out
