"""A slow, dense reference of one HiSo step, used only by tests.

Flattens all trainable tensors into one vector `x`, builds each `u_p` as one dense vector, and applies the
specification's formulas literally (ALGORITHM.md, sections 1 and 2)."""

import math

import numpy as np
import torch
from torch.func import functional_call

from hf_hiso.zo_estimators import direction_seed
from hf_hiso.zo_random import gaussian_table


def counter_numbers(key: int, count: int, distribution: str = "gaussian") -> torch.Tensor:
    """Numbers `0 .. count - 1` of the counter generator's stream `key`, from its documented formula (numpy uint64
    arithmetic and explicit bit shifts: an implementation independent of the library's torch one)."""
    lanes, bits = (4, 16) if distribution == "gaussian" else (8, 8)
    with np.errstate(over="ignore"):
        counters = np.arange(1, math.ceil(count / lanes) + 1, dtype=np.uint64)
        x = np.uint64(key) + counters * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    lane = np.stack([(x >> np.uint64(bits * k)) & np.uint64((1 << bits) - 1) for k in range(lanes)], 1).reshape(-1)
    lane = lane[:count].astype(np.int64)
    if distribution == "gaussian":
        return gaussian_table()[torch.from_numpy(lane)]
    return torch.from_numpy(np.where(lane >> (bits - 1), -1.0, 1.0).astype(np.float32))


def dense_direction(shapes, seed: int, index: int, generator: str = "counter", distribution: str = "gaussian"):
    """`u_p` over all tensors as one flat float32 vector."""
    if generator == "counter":
        return counter_numbers(direction_seed(seed, index), sum(math.prod(s) for s in shapes), distribution)
    assert generator == "cpu" and distribution == "gaussian"
    gen = torch.Generator().manual_seed(direction_seed(seed, index))
    return torch.cat([torch.randn(s, generator=gen, dtype=torch.float32).flatten() for s in shapes])


def reference_step(
    model,
    names,
    loss_on,
    seed,
    lr,
    mu,
    num_directions,
    hessian=None,
    beta=0.95,
    eps=1e-8,
    difference="forward",
    slopes=None,
):
    """Returns (new flat x, new flat H or None, slopes) without touching `model`. With `slopes`, the update uses those
    scalars instead of the reference's own (whose float32 loss noise, divided by mu, would blur the check of the
    update formula)."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    x = torch.cat([params[n].detach().flatten().double() for n in names])

    def f(vec):
        chunks = torch.split(vec.float(), sizes)
        new = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        with torch.no_grad():
            return float(loss_on(lambda **kw: functional_call(model, new, kwargs=kw)))

    h = torch.ones_like(x) if hessian is None else hessian.double()
    zs = [dense_direction(shapes, seed, p).double() / h.sqrt() for p in range(num_directions)]
    f0 = f(x)
    if difference == "forward":
        g = [(f(x + mu * z) - f0) / mu for z in zs]
    else:
        g = [(f(x + mu * z) - f(x - mu * z)) / (2 * mu) for z in zs]
    used = g if slopes is None else [float(s) for s in slopes]
    v = sum(gp * z for gp, z in zip(used, zs, strict=True)) / num_directions
    x_new = x - lr * v
    h_new = None if hessian is None else beta * h + (1 - beta) * (v**2 + eps)
    return x_new, h_new, torch.tensor(g)
