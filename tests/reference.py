"""A slow, dense reference of one HiSo step, used only by tests.

Flattens all trainable tensors into one vector `x`, builds each `u_p` as one dense vector, and applies the
specification's formulas literally (ALGORITHM.md, sections 1 and 2)."""

import torch
from torch.func import functional_call

from hf_hiso.zo_estimators import direction_seed


def dense_direction(shapes, seed: int, index: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(direction_seed(seed, index))
    return torch.cat([torch.randn(s, generator=gen, dtype=torch.float32).flatten() for s in shapes])


def reference_step(
    model, names, loss_on, seed, lr, mu, num_directions, hessian=None, beta=0.95, eps=1e-8, difference="forward"
):
    """Returns (new flat x, new flat H or None, slopes) without touching `model`."""
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
    v = sum(gp * z for gp, z in zip(g, zs, strict=True)) / num_directions
    x_new = x - lr * v
    h_new = None if hessian is None else beta * h + (1 - beta) * (v**2 + eps)
    return x_new, h_new, torch.tensor(g)
