import pytest
import torch

from hf_hiso.zo_estimators import (
    SCRATCH_MIN_NUMEL,
    DirectionSource,
    aggregated_directions,
    direction_seed,
    directional_scalars,
    iter_direction,
    perturb_,
)


def quadratic(dim=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=g, dtype=dtype)
    a = m @ m.T + torch.eye(dim, dtype=dtype)
    b = torch.randn(dim, generator=g, dtype=dtype)
    x = torch.nn.Parameter(torch.randn(dim, generator=g, dtype=dtype))
    return a, b, x


def test_directions_are_reproducible_and_private():
    p = [torch.zeros(3, 4), torch.zeros(5)]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    d1 = list(iter_direction(p, seed=7, index=2))
    assert torch.equal(torch.get_rng_state(), before), "the global RNG must not be touched"
    d2 = list(iter_direction(p, seed=7, index=2))
    d3 = list(iter_direction(p, seed=7, index=3))
    for a, b, c in zip(d1, d2, d3, strict=True):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
    assert direction_seed(1, 0) != direction_seed(0, 1)


def test_directions_depend_only_on_the_parameter_list():
    # Two parties with different parameter values but the same shapes regenerate the same directions.
    a = [torch.randn(2, 3), torch.randn(4)]
    b = [torch.zeros(2, 3), torch.ones(4)]
    for x, y in zip(iter_direction(a, 3, 0), iter_direction(b, 3, 0), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("cache", [False, True])
def test_forward_scalar_on_quadratic_matches_exact_formula(cache):
    a, b, x = quadratic()
    mu = 1e-3

    def loss():
        return 0.5 * x @ a @ x + b @ x

    grad = a @ x.detach() + b
    loss0, slopes, _ = directional_scalars(
        loss, [x], seed=5, num_directions=3, zo_eps=mu, source=DirectionSource(cache=cache)
    )
    for p in range(3):
        (z,) = list(iter_direction([x], 5, p))
        # forward difference of a quadratic: grad.z + mu/2 z^T A z, exactly
        expected = grad @ z + 0.5 * mu * z @ a @ z
        torch.testing.assert_close(slopes[p].double(), expected.float().double(), rtol=1e-5, atol=1e-6)


def test_central_scalar_is_exact_directional_derivative_and_curvature():
    a, b, x = quadratic()
    grad = a @ x.detach() + b

    def loss():
        return 0.5 * x @ a @ x + b @ x

    _, slopes, curv = directional_scalars(loss, [x], seed=1, num_directions=4, zo_eps=1e-2, difference="central")
    for p in range(4):
        (z,) = list(iter_direction([x], 1, p))
        torch.testing.assert_close(slopes[p].double(), (grad @ z).float().double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(curv[p].double(), (z @ a @ z).float().double(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("difference", ["forward", "central"])
def test_measurement_restores_parameters_fp32(difference):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(50, 20)), torch.nn.Parameter(torch.randn(20))]
    before = [p.detach().clone() for p in params]
    scales = [torch.rand_like(p) + 0.5 for p in params]
    directional_scalars(
        lambda: sum((p**2).sum() for p in params),
        params,
        seed=3,
        num_directions=5,
        zo_eps=1e-3,
        scales=scales,
        difference=difference,
    )
    # Restoring is x + a - a (three roundings for central differences): a few ulps of x, so relative to |x| ~ 4.
    for p, q in zip(params, before, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-6)


def test_scaled_direction_and_aggregate():
    params = [torch.zeros(6), torch.zeros(2, 2)]
    scales = [torch.full((6,), 0.5), torch.full((2, 2), 2.0)]
    plain = [list(iter_direction(params, 9, p)) for p in range(2)]
    scaled = list(iter_direction(params, 9, 0, scales))
    torch.testing.assert_close(scaled[0], plain[0][0] * 0.5)
    torch.testing.assert_close(scaled[1], plain[0][1] * 2.0)
    coeffs = torch.tensor([1.5, -3.0])
    for cache in (False, True):
        v = list(aggregated_directions(params, 9, coeffs, scales, DirectionSource(cache=cache)))
        for i in range(2):
            expected = (1.5 * plain[0][i] - 3.0 * plain[1][i]) * scales[i] / 2
            torch.testing.assert_close(v[i], expected)


def test_cache_is_not_corrupted_by_aggregation():
    params = [torch.zeros(4)]
    src = DirectionSource(cache=True)
    first = [t.clone() for t in src.direction(params, 1, 0)]
    list(aggregated_directions(params, 1, torch.tensor([3.0]), None, src))
    perturb_(params, src, 1, 0, 1.0)
    torch.testing.assert_close(next(src.direction(params, 1, 0)), first[0])


@pytest.mark.parametrize("cache", [False, True])
def test_transient_directions_equal_fresh_ones(cache):
    # perturb_ and aggregated_directions draw large tensors into reused scratch buffers: the numbers must be exactly
    # those of iter_direction, for small tensors and large ones, a buffer grown and then viewed smaller, a float64
    # parameter (drawn in float32, then converted), and streams read in turn (as the aggregation reads them).
    big = SCRATCH_MIN_NUMEL
    params = [torch.zeros(3), torch.zeros(big + 7), torch.zeros(big), torch.zeros(big, dtype=torch.float64)]
    scales = [torch.full_like(p, 0.5) + torch.rand(p.shape, dtype=p.dtype) for p in params]
    src = DirectionSource(cache=cache)
    for use_scales in (None, scales):
        fresh = [list(iter_direction(params, 11, index, use_scales)) for index in range(2)]
        streams = [src.transient(params, 11, index, use_scales) for index in range(2)]
        for i in range(len(params)):
            for index, stream in enumerate(streams):
                assert torch.equal(next(stream), fresh[index][i])


def test_unknown_generator_and_difference():
    with pytest.raises(ValueError, match="generator"):
        DirectionSource(generator="gpu")
    with pytest.raises(ValueError, match="difference"):
        directional_scalars(lambda: torch.tensor(0.0), [torch.zeros(1)], 0, 1, 1e-3, difference="backward")
