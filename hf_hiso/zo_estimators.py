"""Zeroth-order building blocks, in pure torch (no transformers import).

Everything here works on an ordered list of parameter tensors. A *direction* `u_p` for step seed `s` and direction
index `p` is a function of `direction_seed(s, p)`, of the tensors' shapes and of their order only. Any party holding
the same parameter list (same shapes, same order) therefore regenerates the same `u_p` from `(s, p)` alone, which is
what lets federated parties exchange seeds and scalars instead of tensors.

Generators (`generator`):

* `"counter"` (default): number `j` of the flattened parameter list (tensors in order, each in row-major order) is
  number `j` of the counter-based stream keyed by `direction_seed(s, p)` (`hf_hiso.zo_random`): computed with integer
  torch ops on each tensor's own device, so the same numbers on the CPU and on any accelerator, for any thread count.
* `"cpu"`: a private CPU `torch.Generator` seeded with `direction_seed(s, p)`, one `randn` call per tensor, tensors
  in order, moved to the tensor's device (the generator of versions up to 0.1; single-threaded, 3 to 5 ns a number).
* `"device"`: the same on each tensor's own device (an accelerator's generator gives other numbers than the CPU's).

Distributions (`distribution`): `"gaussian"` (default; for `"counter"` a 16-bit quantile table of `N(0, 1)`, see
`hf_hiso.zo_random`) or `"rademacher"` (+-1 with equal probability). Both have `E[u u^T] = I`.

With a diagonal preconditioner `H`, the perturbation is `z_p = u_p / sqrt(H)`; callers pass `scales = H ** -0.5`
(one tensor per parameter, or an [`InverseSqrt`] that computes them when read) or `None` for `H = I`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from .zo_random import DISTRIBUTIONS, fill_

MASK64 = (1 << 64) - 1

GENERATORS = ("counter", "cpu", "device")
DIFFERENCES = ("forward", "central")
# Tensors from this size on (256 KiB in float32) are drawn into reused scratch buffers: the C allocator maps such
# blocks fresh from the OS, page faults included, while smaller ones come cheaply from its heap. Runs of smaller
# tensors are drawn by the counter generator in one call of at most `GROUP_NUMEL` numbers (one call per tensor would
# cost more in per-call overhead than in arithmetic: a model has about ten small tensors per layer).
SCRATCH_MIN_NUMEL = 1 << 16
GROUP_NUMEL = 1 << 20
# `InverseSqrt.scale_` forms `H ** -0.5`, and `perturb_` adds `alpha * z` to a large tensor, in pieces of this many
# entries: the piece of `z` stays in the CPU's cache instead of making a round trip through memory.
SCALE_CHUNK = 1 << 20


def _splitmix64(x: int) -> int:
    # A well-mixed 64-bit hash so that nearby (seed, index) pairs give unrelated generator states.
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def direction_seed(step_seed: int, index: int) -> int:
    """Seed of direction `index` of the step with seed `step_seed`: `splitmix64(splitmix64(s) ^ index) mod 2**63`."""
    return _splitmix64(_splitmix64(int(step_seed) & MASK64) ^ int(index)) & ((1 << 63) - 1)


def step_seed(base_seed: int, step: int) -> int:
    """Seed of optimizer step `step` of a run seeded with `base_seed` (centralized training)."""
    return direction_seed(base_seed, (1 << 32) + int(step))


def check_direction_settings(generator: str, distribution: str) -> None:
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


class InverseSqrt(Sequence):
    """`H ** -0.5` per tensor in the parameters' dtypes, computed when read instead of kept (a second `d`-sized
    tensor beside `H` would cost as much memory as `H` itself). Consumers in this module scale a direction in place
    with [`InverseSqrt.scale_`], which needs no tensor-sized temporary; the numbers are those of
    `u * H.rsqrt().to(dtype)`."""

    def __init__(self, hessians: Sequence[torch.Tensor], dtypes: Sequence[torch.dtype]):
        self.hessians = list(hessians)
        self.dtypes = list(dtypes)

    def __len__(self) -> int:
        return len(self.hessians)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.hessians[i].rsqrt().to(self.dtypes[i])

    def scale_(self, i: int, u: torch.Tensor) -> torch.Tensor:
        """`u <- u * H_i ** -0.5` in place, in pieces of `SCALE_CHUNK` entries."""
        h, dtype = self.hessians[i], self.dtypes[i]
        if u.numel() <= SCALE_CHUNK or not (u.is_contiguous() and h.is_contiguous()):
            return u.mul_(h.rsqrt().to(dtype))
        uf, hf = u.view(-1), h.view(-1)
        for s in range(0, uf.numel(), SCALE_CHUNK):
            uf[s : s + SCALE_CHUNK].mul_(hf[s : s + SCALE_CHUNK].rsqrt().to(dtype))
        return u


def _scale_(u: torch.Tensor, scales: Sequence[torch.Tensor], i: int) -> torch.Tensor:
    if isinstance(scales, InverseSqrt):
        return scales.scale_(i, u)
    return u.mul_(scales[i])


def _draw_torch_(u: torch.Tensor, gen: torch.Generator, distribution: str) -> torch.Tensor:
    # `normal_` on a contiguous float32 tensor draws exactly the numbers of `torch.randn` (tested).
    if distribution == "gaussian":
        return u.normal_(generator=gen)
    return u.random_(0, 2, generator=gen).mul_(2).sub_(1)


def _counter_stream(
    params: Sequence[torch.Tensor],
    key: int,
    distribution: str,
    scratch: Callable[[torch.Size, torch.device, torch.dtype], torch.Tensor] | None = None,
    start: int = 0,
) -> Iterator[torch.Tensor]:
    """Yields `u_p` of the counter generator as float32 tensors on each tensor's device, `params[0]` starting at
    number `start` of the stream. Large tensors are drawn into `scratch(shape, device, dtype)` if given (else new
    tensors); runs of small tensors on one device share one new buffer (each yielded tensor is a view of it)."""
    offset, i, n = start, 0, len(params)
    while i < n:
        p = params[i]
        if p.numel() >= SCRATCH_MIN_NUMEL:
            out = scratch(p.shape, p.device, torch.float32) if scratch else None
            if out is None:
                out = torch.empty(p.shape, device=p.device, dtype=torch.float32)
            yield fill_(out, key, offset, distribution)
            offset += p.numel()
            i += 1
            continue
        j, total = i, 0
        while j < n:
            q = params[j]
            if q.numel() >= SCRATCH_MIN_NUMEL or q.device != p.device or (j > i and total + q.numel() > GROUP_NUMEL):
                break
            total += q.numel()
            j += 1
        flat = fill_(torch.empty(total, device=p.device, dtype=torch.float32), key, offset, distribution)
        pos = 0
        for q in params[i:j]:
            yield flat[pos : pos + q.numel()].view(q.shape)
            pos += q.numel()
        offset += total
        i = j


def iter_direction(
    params: Sequence[torch.Tensor],
    seed: int,
    index: int,
    scales: Sequence[torch.Tensor] | None = None,
    generator: str = "counter",
    distribution: str = "gaussian",
) -> Iterator[torch.Tensor]:
    """Yields `z_p` tensor by tensor as new tensors (lazily, so only a tensor-sized buffer is alive at a time).

    Args:
        params: the trainable tensors, in the documented order.
        seed: the step seed `s`.
        index: the direction index `p`.
        scales: `H ** -0.5` per tensor, or `None` for `H = I` (plain directions).
        generator: `"counter"`, `"cpu"` or `"device"` (see the module's docstring).
        distribution: `"gaussian"` or `"rademacher"`.
    """
    check_direction_settings(generator, distribution)
    dseed = direction_seed(seed, index)
    if generator == "counter":
        for i, (p, u) in enumerate(zip(params, _counter_stream(params, dseed, distribution), strict=True)):
            u = u.to(dtype=p.dtype)
            yield u if scales is None else _scale_(u, scales, i)
        return
    gens: dict[torch.device, torch.Generator] = {}
    for i, p in enumerate(params):
        dev = torch.device("cpu") if generator == "cpu" else p.device
        gen = gens.get(dev)
        if gen is None:
            gen = gens[dev] = torch.Generator(device=dev).manual_seed(dseed)
        if distribution == "gaussian":
            u = torch.randn(p.shape, generator=gen, device=dev, dtype=torch.float32)
        else:
            u = _draw_torch_(torch.empty(p.shape, device=dev, dtype=torch.float32), gen, distribution)
        u = u.to(device=p.device, dtype=p.dtype, non_blocking=True)
        if scales is not None:
            _scale_(u, scales, i)
        yield u


class DirectionSource:
    """Produces `z_p` for a step, either regenerated on every use (memory `O(largest tensor)`, MeZO-style) or cached
    for the current step (memory `P * d`, one generation per direction instead of three).

    The cache holds `u_p` (not `z_p`), keyed by the step seed, so it stays valid when `H` changes inside a step.

    [`perturb_`] and [`aggregated_directions`] read directions through [`DirectionSource.transient`], which draws
    large tensors into scratch buffers kept by the source (one per device and dtype, as large as the largest tensor):
    on CPU a fresh tensor of that size pays its page faults again on every allocation (`benchmarks/step_cost.py`).
    """

    def __init__(self, generator: str = "counter", cache: bool = False, distribution: str = "gaussian"):
        check_direction_settings(generator, distribution)
        self.generator = generator
        self.distribution = distribution
        self.cache = cache
        self._cached_seed: int | None = None
        self._cached: dict[int, list[torch.Tensor]] = {}
        self._scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def name(self) -> str:
        """`"<generator>/<distribution>"`: what parties must agree on to rebuild each other's directions."""
        return f"{self.generator}/{self.distribution}"

    def clear(self) -> None:
        self._cached_seed = None
        self._cached = {}

    def _cached_direction(self, params: Sequence[torch.Tensor], seed: int, index: int) -> list[torch.Tensor]:
        if self._cached_seed != seed:
            self.clear()
            self._cached_seed = seed
        us = self._cached.get(index)
        if us is None:
            us = self._cached[index] = list(
                iter_direction(params, seed, index, None, self.generator, self.distribution)
            )
        return us

    def _buffer(self, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        numel = shape.numel()
        buf = self._scratch.get((device, dtype))
        if buf is None or buf.numel() < numel:
            buf = self._scratch[(device, dtype)] = torch.empty(numel, device=device, dtype=dtype)
        return buf[:numel].view(shape)

    def direction(
        self, params: Sequence[torch.Tensor], seed: int, index: int, scales: Sequence[torch.Tensor] | None = None
    ) -> Iterator[torch.Tensor]:
        """Yields `z_p` tensor by tensor as new tensors (a cached `u_p` itself when `scales` is `None`: do not modify
        it in place)."""
        if not self.cache:
            yield from iter_direction(params, seed, index, scales, self.generator, self.distribution)
            return
        for i, u in enumerate(self._cached_direction(params, seed, index)):
            yield u if scales is None else _scale_(u.clone(), scales, i)

    def transient(
        self, params: Sequence[torch.Tensor], seed: int, index: int, scales: Sequence[torch.Tensor] | None = None
    ) -> Iterator[torch.Tensor]:
        """Yields the same numbers as [`DirectionSource.direction`], in scratch buffers that the next tensor yielded
        by any `transient` stream of this source overwrites: for consumers that use each tensor at once and never
        modify it in place."""
        if self.cache:
            for i, u in enumerate(self._cached_direction(params, seed, index)):
                if scales is None:
                    yield u
                elif u.numel() < SCRATCH_MIN_NUMEL:
                    yield _scale_(u.clone(), scales, i)
                else:
                    yield _scale_(self._buffer(u.shape, u.device, u.dtype).copy_(u), scales, i)
            return
        dseed = direction_seed(seed, index)
        if self.generator == "counter":
            raw = _counter_stream(params, dseed, self.distribution, self._cpu_scratch)
        else:
            raw = self._torch_stream(params, dseed)
        for i, (p, u) in enumerate(zip(params, raw, strict=True)):
            if u.device != p.device or u.dtype != p.dtype:
                if p.numel() >= SCRATCH_MIN_NUMEL and p.device.type == "cpu":
                    u = self._buffer(p.shape, p.device, p.dtype).copy_(u)
                else:
                    u = u.to(device=p.device, dtype=p.dtype, non_blocking=True)
            if scales is not None:
                _scale_(u, scales, i)
            yield u

    def _cpu_scratch(self, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        # Accelerator allocators recycle memory without page faults; scratch buffers only pay off on the CPU. The
        # float32 draw for a float64 parameter has a buffer of its own (the float64 one receives the copy).
        return self._buffer(shape, device, dtype) if device.type == "cpu" else None

    def _torch_stream(self, params: Sequence[torch.Tensor], dseed: int) -> Iterator[torch.Tensor]:
        gens: dict[torch.device, torch.Generator] = {}
        for p in params:
            dev = torch.device("cpu") if self.generator == "cpu" else p.device
            gen = gens.get(dev)
            if gen is None:
                gen = gens[dev] = torch.Generator(device=dev).manual_seed(dseed)
            if p.numel() >= SCRATCH_MIN_NUMEL and dev.type == "cpu":
                yield _draw_torch_(self._buffer(p.shape, dev, torch.float32), gen, self.distribution)
            elif self.distribution == "gaussian":
                # Accelerator allocators recycle memory without page faults; keep the reference call there.
                yield torch.randn(p.shape, generator=gen, device=dev, dtype=torch.float32)
            else:
                yield _draw_torch_(torch.empty(p.shape, device=dev, dtype=torch.float32), gen, self.distribution)


def _scale_piece(scales: Sequence[torch.Tensor], i: int, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(scales, InverseSqrt):
        return scales.hessians[i].reshape(-1)[lo:hi].rsqrt().to(dtype)
    return scales[i].reshape(-1)[lo:hi]


def _fusable(p: torch.Tensor) -> bool:
    return p.numel() >= SCRATCH_MIN_NUMEL and p.is_contiguous()


@torch.no_grad()
def perturb_(
    params: Sequence[torch.Tensor],
    source: DirectionSource,
    seed: int,
    index: int,
    alpha: float,
    scales: Sequence[torch.Tensor] | None = None,
) -> None:
    """In place: `x <- x + alpha * z_p`.

    Large contiguous tensors are updated piece by piece (`SCALE_CHUNK` entries): the piece of `u_p` is drawn (or read
    from the cache), scaled and added while it is in the CPU's cache, so `z_p` never makes a round trip through
    memory. The numbers are those of `x + alpha * z_p` with `z_p` from [`DirectionSource.transient`] (tested)."""
    if not source.cache and source.generator != "counter":
        for p, z in zip(params, source.transient(params, seed, index, scales), strict=True):
            p.add_(z, alpha=alpha)
        return
    if source.cache:
        for i, (p, u) in enumerate(zip(params, source._cached_direction(params, seed, index), strict=True)):
            if scales is None:
                p.add_(u, alpha=alpha)
            elif not _fusable(p):
                p.add_(_scale_(u.clone(), scales, i), alpha=alpha)
            else:
                flat, uf = p.view(-1), u.view(-1)
                for lo in range(0, flat.numel(), SCALE_CHUNK):
                    hi = min(lo + SCALE_CHUNK, flat.numel())
                    z = torch.mul(uf[lo:hi], _scale_piece(scales, i, lo, hi, p.dtype))
                    flat[lo:hi].add_(z, alpha=alpha)
        return
    key, offset, i = direction_seed(seed, index), 0, 0
    while i < len(params):
        j = i
        while j < len(params) and not _fusable(params[j]):
            j += 1
        # Tensors i .. j - 1 are small (or not contiguous): drawn as the transient stream draws them.
        run = params[i:j]
        stream = _counter_stream(run, key, source.distribution, start=offset)
        for k, (p, u) in enumerate(zip(run, stream, strict=True), start=i):
            u = u.to(p.dtype)
            p.add_(u if scales is None else _scale_(u, scales, k), alpha=alpha)
            offset += p.numel()
        if j == len(params):
            break
        p, flat = params[j], params[j].view(-1)
        buf = source._buffer(torch.Size([SCALE_CHUNK]), p.device, torch.float32)
        for lo in range(0, flat.numel(), SCALE_CHUNK):
            hi = min(lo + SCALE_CHUNK, flat.numel())
            z = fill_(buf[: hi - lo], key, offset + lo, source.distribution).to(p.dtype)
            if scales is not None:
                z.mul_(_scale_piece(scales, j, lo, hi, p.dtype))
            flat[lo:hi].add_(z, alpha=alpha)
        offset += flat.numel()
        i = j + 1


@torch.no_grad()
def directional_scalars(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    seed: int,
    num_directions: int,
    zo_eps: float,
    scales: Sequence[torch.Tensor] | None = None,
    difference: str = "forward",
    source: DirectionSource | None = None,
    loss0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Measures the directional scalars of one ZO step; the parameters end where they started.

    Forward difference (`P + 1` loss evaluations): `g_p = (f(x + mu z_p) - f(x)) / mu`.
    Central difference (`2P + 1`): `g_p = (f(x + mu z_p) - f(x - mu z_p)) / (2 mu)`; the unperturbed loss is still
    evaluated so that the reported loss is `f(x)` and a curvature scalar
    `c_p = (f(x + mu z_p) + f(x - mu z_p) - 2 f(x)) / mu**2` (about `z_p^T Hess z_p`) comes for free.

    Args:
        loss_fn: evaluates the loss at the current parameters (no autograd needed).
        loss0: `f(x)` if already known (skips one evaluation).

    Returns:
        `(loss0, slopes, curvatures)`: `f(x)` as a 0-d tensor on the loss's device, `g` of shape `(P,)`, and `c`
        of shape `(P,)` (NaN for forward differences, where it cannot be formed).
    """
    if difference not in DIFFERENCES:
        raise ValueError(f"difference must be one of {DIFFERENCES}, got {difference!r}")
    source = source or DirectionSource()
    if loss0 is None:
        loss0 = loss_fn()
    # Differences are formed in float64 so that a float64 model keeps its precision (a float32 loss is unchanged).
    loss0 = loss0.detach()
    f0 = loss0.double()
    slopes = torch.empty(num_directions, dtype=torch.float32)
    curvatures = torch.full((num_directions,), float("nan"), dtype=torch.float32)
    for index in range(num_directions):
        perturb_(params, source, seed, index, zo_eps, scales)
        loss_plus = loss_fn().detach().double()
        if difference == "forward":
            perturb_(params, source, seed, index, -zo_eps, scales)
            slopes[index] = ((loss_plus - f0) / zo_eps).cpu()
        else:
            perturb_(params, source, seed, index, -2.0 * zo_eps, scales)
            loss_minus = loss_fn().detach().double()
            perturb_(params, source, seed, index, zo_eps, scales)
            slopes[index] = ((loss_plus - loss_minus) / (2.0 * zo_eps)).cpu()
            curvatures[index] = ((loss_plus + loss_minus - 2.0 * f0) / zo_eps**2).cpu()
    return loss0, slopes, curvatures


def _counter_aggregate(
    params: Sequence[torch.Tensor],
    keys: Sequence[int],
    coeffs: Sequence[float],
    distribution: str,
    scales: Sequence[torch.Tensor] | None,
) -> Iterator[torch.Tensor]:
    """[`aggregated_directions`] for the counter generator without the cache: large contiguous tensors are summed piece
    by piece (no tensor-sized drawing buffer), runs of small ones through the streams; the same numbers."""
    offset, i, buf = 0, 0, None
    while i < len(params):
        j = i
        while j < len(params) and not _fusable(params[j]):
            j += 1
        run = params[i:j]
        streams = [_counter_stream(run, key, distribution, start=offset) for key in keys]
        for k, p in enumerate(run, start=i):
            v = None
            for stream, c in zip(streams, coeffs, strict=True):
                z = next(stream).to(p.dtype)
                v = z * c if v is None else v.add_(z, alpha=c)
            yield v if scales is None else _scale_(v, scales, k)
            offset += p.numel()
        if j == len(params):
            return
        p = params[j]
        v = torch.empty_like(p)
        flat = v.view(-1)
        if buf is None or buf.device != p.device:
            buf = torch.empty(SCALE_CHUNK, device=p.device, dtype=torch.float32)
        for lo in range(0, flat.numel(), SCALE_CHUNK):
            hi = min(lo + SCALE_CHUNK, flat.numel())
            piece = flat[lo:hi]
            for t, (key, c) in enumerate(zip(keys, coeffs, strict=True)):
                z = fill_(buf[: hi - lo], key, offset + lo, distribution).to(p.dtype)
                if t == 0:
                    torch.mul(z, c, out=piece)
                else:
                    piece.add_(z, alpha=c)
            if scales is not None:
                piece.mul_(_scale_piece(scales, j, lo, hi, p.dtype))
        yield v
        offset += flat.numel()
        i = j + 1


@torch.no_grad()
def aggregated_directions(
    params: Sequence[torch.Tensor],
    seed: int,
    coefficients: torch.Tensor,
    scales: Sequence[torch.Tensor] | None = None,
    source: DirectionSource | None = None,
) -> Iterator[torch.Tensor]:
    """Yields, tensor by tensor, `v = (1 / P) * sum_p coefficients[p] * z_p`.

    The loop runs tensor-outer, direction-inner with one generator per direction advancing in parameter order, so
    only one tensor-sized buffer per direction is alive instead of a full copy of the parameters. The scales are
    common to the `P` directions, so they are applied once to the sum, `v = ((1 / P) * sum_p c_p u_p) * H ** -0.5`,
    instead of to every `u_p`: `P - 1` fewer passes over `d`; the result differs from scaling each direction by
    float32 rounding only (a relative `~1e-7` per entry).
    """
    source = source or DirectionSource()
    num_directions = len(coefficients)
    coeffs = [float(c) / num_directions for c in coefficients]
    if not source.cache and source.generator == "counter":
        keys = [direction_seed(seed, index) for index in range(num_directions)]
        yield from _counter_aggregate(params, keys, coeffs, source.distribution, scales)
        return
    streams = [source.transient(params, seed, index, None) for index in range(num_directions)]
    for i, _ in enumerate(params):
        v = None
        for stream, c in zip(streams, coeffs, strict=True):
            z = next(stream)
            if v is None:
                # A new tensor: `z` is a scratch buffer (or a cached direction), and callers may keep `v`.
                v = z * c
            else:
                v.add_(z, alpha=c)
        if scales is not None:
            _scale_(v, scales, i)
        yield v
