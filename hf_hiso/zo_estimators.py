"""Zeroth-order building blocks, in pure torch (no transformers import).

Everything here works on an ordered list of parameter tensors. A *direction* `u_p` for step seed `s` and direction
index `p` is drawn from a private `torch.Generator` seeded with `direction_seed(s, p)`: one generator per direction,
one `randn` call per tensor, tensors in list order. Any party holding the same parameter list (same shapes, same
order) therefore regenerates the same `u_p` from `(s, p)` alone, which is what lets federated parties exchange
seeds and scalars instead of tensors.

With a diagonal preconditioner `H`, the perturbation is `z_p = u_p / sqrt(H)`; callers pass `scales = H ** -0.5`
(one tensor per parameter) or `None` for `H = I`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

MASK64 = (1 << 64) - 1

GENERATORS = ("cpu", "device")
DIFFERENCES = ("forward", "central")
# "gaussian": u ~ N(0, I). "rademacher": independent +-1 entries (every direction has norm sqrt(d); E[u u^T] = I too).
DISTRIBUTIONS = ("gaussian", "rademacher")
# Tensors from this size on (256 KiB in float32) are drawn into reused scratch buffers: the C allocator maps such
# blocks fresh from the OS, page faults included, while smaller ones come cheaply from its heap.
SCRATCH_MIN_NUMEL = 1 << 16


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


def _draw(
    shape: torch.Size, gen: torch.Generator, device: torch.device, distribution: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    """One tensor of a direction in float32: `randn` (the reference call) or +-1 entries from `random_(0, 2)`; `out`
    (contiguous float32) receives exactly the numbers a fresh tensor would."""
    if distribution == "rademacher":
        out = torch.empty(shape, device=device, dtype=torch.float32) if out is None else out
        return out.random_(0, 2, generator=gen).mul_(2.0).sub_(1.0)
    if out is not None and device.type == "cpu":
        # `normal_` on a contiguous float32 tensor draws exactly the numbers of `torch.randn` (tested).
        return out.normal_(generator=gen)
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)


def iter_direction(
    params: Sequence[torch.Tensor],
    seed: int,
    index: int,
    scales: Sequence[torch.Tensor] | None = None,
    generator: str = "cpu",
    distribution: str = "gaussian",
) -> Iterator[torch.Tensor]:
    """Yields `z_p` tensor by tensor (lazily, so only one tensor-sized buffer is alive at a time).

    Args:
        params: the trainable tensors, in the documented order.
        seed: the step seed `s`.
        index: the direction index `p`.
        scales: `H ** -0.5` per tensor, or `None` for `H = I` (plain Gaussian directions).
        generator: `"cpu"` draws `u_p ~ N(0, I)` in float32 on the CPU and moves it to the tensor's device: the same
            numbers on every machine and device. `"device"` draws on each tensor's own device (faster on GPUs, but a
            CUDA generator gives other numbers than a CPU one, so every party must use the same kind of device).
        distribution: `"gaussian"` (`u_p ~ N(0, I)`) or `"rademacher"` (independent +-1 entries).
    """
    gens: dict[torch.device, torch.Generator] = {}
    dseed = direction_seed(seed, index)
    for i, p in enumerate(params):
        dev = torch.device("cpu") if generator == "cpu" else p.device
        gen = gens.get(dev)
        if gen is None:
            gen = gens[dev] = torch.Generator(device=dev).manual_seed(dseed)
        u = _draw(p.shape, gen, dev, distribution)
        u = u.to(device=p.device, dtype=p.dtype, non_blocking=True)
        if scales is not None:
            u.mul_(scales[i])
        yield u


class DirectionSource:
    """Produces `z_p` for a step, either regenerated on every use (memory `O(largest tensor)`, MeZO-style) or cached
    for the current step (memory `P * d`, one generation per direction instead of three).

    The cache holds `u_p` (not `z_p`), keyed by the step seed, so it stays valid when `H` changes inside a step.

    [`perturb_`] and [`aggregated_directions`] read directions through [`DirectionSource.transient`], which draws
    large tensors into scratch buffers kept by the source (one per device and dtype, as large as the largest tensor):
    on CPU a fresh tensor of that size pays its page faults again on every allocation (`benchmarks/step_cost.py`).
    """

    def __init__(self, generator: str = "cpu", cache: bool = False, distribution: str = "gaussian"):
        if generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        self.generator = generator
        self.distribution = distribution
        self.cache = cache
        self._cached_seed: int | None = None
        self._cached: dict[int, list[torch.Tensor]] = {}
        self._scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def clear(self) -> None:
        self._cached_seed = None
        self._cached = {}

    def _cached_direction(self, params: Sequence[torch.Tensor], seed: int, index: int) -> list[torch.Tensor]:
        if self._cached_seed != seed:
            self.clear()
            self._cached_seed = seed
        us = self._cached.get(index)
        if us is None:
            us = list(iter_direction(params, seed, index, None, self.generator, self.distribution))
            self._cached[index] = us
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
            yield u if scales is None else u * scales[i]

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
                    yield u * scales[i]
                else:
                    yield torch.mul(u, scales[i], out=self._buffer(u.shape, u.device, u.dtype))
            return
        gens: dict[torch.device, torch.Generator] = {}
        dseed = direction_seed(seed, index)
        for i, p in enumerate(params):
            dev = torch.device("cpu") if self.generator == "cpu" else p.device
            gen = gens.get(dev)
            if gen is None:
                gen = gens[dev] = torch.Generator(device=dev).manual_seed(dseed)
            large = p.numel() >= SCRATCH_MIN_NUMEL
            # Accelerator allocators recycle memory without page faults: large CPU tensors only use the scratch buffer.
            out = self._buffer(p.shape, dev, torch.float32) if large and dev.type == "cpu" else None
            u = _draw(p.shape, gen, dev, self.distribution, out)
            if u.device != p.device or u.dtype != p.dtype:
                if large and p.device.type == "cpu":
                    u = self._buffer(p.shape, p.device, p.dtype).copy_(u)
                else:
                    u = u.to(device=p.device, dtype=p.dtype, non_blocking=True)
            if scales is not None:
                u.mul_(scales[i])
            yield u


@torch.no_grad()
def perturb_(
    params: Sequence[torch.Tensor],
    source: DirectionSource,
    seed: int,
    index: int,
    alpha: float,
    scales: Sequence[torch.Tensor] | None = None,
) -> None:
    """In place: `x <- x + alpha * z_p`."""
    for p, z in zip(params, source.transient(params, seed, index, scales), strict=True):
        p.add_(z, alpha=alpha)


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
    only one tensor-sized buffer per direction is alive instead of a full copy of the parameters.
    """
    source = source or DirectionSource()
    num_directions = len(coefficients)
    coeffs = [float(c) / num_directions for c in coefficients]
    streams = [source.transient(params, seed, index, scales) for index in range(num_directions)]
    for _ in params:
        v = None
        for stream, c in zip(streams, coeffs, strict=True):
            z = next(stream)
            if v is None:
                # A new tensor: `z` is a scratch buffer (or a cached direction), and callers may keep `v`.
                v = z * c
            else:
                v.add_(z, alpha=c)
        yield v
