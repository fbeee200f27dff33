"""The counter-based direction generator (hf_hiso.zo_random) and its use in hf_hiso.zo_estimators."""

import pytest
import torch
from reference import counter_numbers, dense_direction

from hf_hiso import zo_estimators, zo_random
from hf_hiso.zo_estimators import DirectionSource, InverseSqrt, direction_seed, iter_direction
from hf_hiso.zo_random import fill_, gaussian_table, hash_counters

CHUNK = 1 << 10  # the generator's chunk size in these tests: several chunks at a small cost


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(zo_random, "CHUNK", CHUNK)


# Computed once with this code on a CPU and kept: any device and any later version must give these numbers.
# (distribution, key, start, numbers start .. start + 3)
REFERENCE = [
    ("gaussian", 0, 0, [0.8540507555007935, -0.04784800112247467, 0.4046398997306824, 1.1917011737823486]),
    ("gaussian", 0, 5, [0.3364601135253906, 0.302366703748703, -0.17249168455600739, -0.6105695962905884]),
    ("gaussian", 0, 1000003, [-0.1108989268541336, 1.1941945552825928, -0.8820366263389587, -0.6302286386489868]),
    (
        "gaussian",
        8813426091163714890,
        0,
        [1.340650200843811, 1.133221983909607, 1.2687240839004517, 1.6078829765319824],
    ),
    (
        "gaussian",
        8813426091163714890,
        1000003,
        [-0.582556426525116, 0.48368018865585327, -0.6642321944236755, 0.6025702357292175],
    ),
    ("rademacher", 0, 0, [-1.0, -1.0, 1.0, 1.0]),
    ("rademacher", 0, 1000003, [1.0, -1.0, 1.0, -1.0]),
    ("rademacher", 8813426091163714890, 5, [-1.0, 1.0, -1.0, 1.0]),
]


def devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


def test_first_output_is_splitmix64s():
    # The published first SplitMix64 output for seed 0; anchors the documented formula.
    (h,) = hash_counters(0, 0, 1, torch.device("cpu")).tolist()
    assert h & ((1 << 64) - 1) == 0xE220A8397B1DCDAF


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_stored_reference_values(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine: the accelerator half of the cross-device check cannot run here")
    for distribution, key, start, expected in REFERENCE:
        got = fill_(torch.empty(4, device=device), key, start, distribution).cpu()
        assert got.tolist() == expected, (distribution, key, start)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_torch_generator_equals_independent_numpy_formula(distribution):
    key = direction_seed(7, 1)
    n = 2 * CHUNK * zo_random.LANES[distribution] + 13  # three chunks, the last one partial
    full = counter_numbers(key, n, distribution)
    assert torch.equal(fill_(torch.empty(n), key, 0, distribution), full)
    for start in (1, 3, 7, CHUNK * zo_random.LANES[distribution] - 1):
        part = fill_(torch.empty(n - start - 5), key, start, distribution)
        assert torch.equal(part, full[start : start + part.numel()]), start


def test_same_numbers_for_any_thread_count(monkeypatch):
    # Chunks above torch's parallel grain size (32768 elements), so that 2 threads really split the work.
    monkeypatch.setattr(zo_random, "CHUNK", 1 << 16)
    saved = torch.get_num_threads()
    out = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[threads] = [fill_(torch.empty(3 * (1 << 18) + 1), 99, 2, d) for d in ("gaussian", "rademacher")]
    finally:
        torch.set_num_threads(saved)
    for a, b in zip(out[1], out[2], strict=True):
        assert torch.equal(a, b)


def test_gaussian_table_moments():
    t = gaussian_table().double()
    assert torch.equal(t, -t.flip(0))  # symmetric: every odd moment is exactly 0
    assert t.square().mean().item() == pytest.approx(1.0, abs=1e-7)
    assert t.pow(4).mean().item() == pytest.approx(3.0, abs=2e-3)
    assert t.abs().max().item() < 4.4


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_sample_moments_and_independence(distribution):
    n = 1 << 20
    tol = 5 / n**0.5  # five standard errors of a mean of n unit-variance terms
    u0, u1 = (fill_(torch.empty(n), direction_seed(3, p), 0, distribution).double() for p in range(2))
    assert abs(u0.mean().item()) < tol
    assert u0.square().mean().item() == pytest.approx(1.0, abs=5 * (2 / n) ** 0.5)
    # Directions are uncorrelated with each other, and neighbouring entries (lanes of one hash, and across hashes)
    # with each other: E[z z^T] = I.
    assert abs((u0 * u1).mean().item()) < tol
    for lag in (1, 4, 8):
        assert abs((u0[:-lag] * u0[lag:]).mean().item()) < tol, lag
    if distribution == "rademacher":
        assert set(u0.unique().tolist()) == {-1.0, 1.0}
    else:
        assert u0.pow(4).mean().item() == pytest.approx(3.0, abs=0.05)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_direction_is_the_flattened_parameter_stream(monkeypatch, distribution):
    # Small tensors are drawn in groups: lower the group size so that several groups and a large tensor mix.
    monkeypatch.setattr(zo_estimators, "GROUP_NUMEL", 40)
    shapes = [(3, 4), (5,), (30,), (2, 20), (zo_estimators.SCRATCH_MIN_NUMEL + 3,), (7,)]
    params = [torch.zeros(s) for s in shapes]
    expected = dense_direction(shapes, 5, 2, distribution=distribution)
    got = torch.cat([u.flatten() for u in iter_direction(params, 5, 2, distribution=distribution)])
    assert torch.equal(got, expected)
    for cache in (False, True):
        src = DirectionSource(cache=cache, distribution=distribution)
        streams = [src.transient(params, 5, p) for p in (2, 3)]
        other = dense_direction(shapes, 5, 3, distribution=distribution)
        pos = 0
        for p in params:
            # Read in turn, as the aggregation reads them: each tensor is used before the next one is drawn.
            assert torch.equal(next(streams[0]).flatten(), expected[pos : pos + p.numel()])
            assert torch.equal(next(streams[1]).flatten(), other[pos : pos + p.numel()])
            pos += p.numel()


def test_float64_parameters_get_the_float32_numbers():
    params = [torch.zeros(3, dtype=torch.float64), torch.zeros(zo_estimators.SCRATCH_MIN_NUMEL, dtype=torch.float64)]
    expected = dense_direction([p.shape for p in params], 1, 0).double()
    for src in (DirectionSource(), DirectionSource(cache=True)):
        got = torch.cat([u.flatten() for u in src.transient(params, 1, 0)])
        assert got.dtype == torch.float64 and torch.equal(got, expected)


def test_cpu_generator_keeps_torch_randn_numbers():
    shapes = [(4, 3), (zo_estimators.SCRATCH_MIN_NUMEL,)]
    params = [torch.zeros(s) for s in shapes]
    expected = dense_direction(shapes, 8, 1, generator="cpu")
    for src in (DirectionSource("cpu"), DirectionSource("cpu", cache=True)):
        assert torch.equal(torch.cat([u.flatten() for u in src.transient(params, 8, 1)]), expected)


@pytest.mark.parametrize("generator", ["cpu", "device"])
def test_torch_generators_draw_rademacher_signs(generator):
    params = [torch.zeros(5), torch.zeros(zo_estimators.SCRATCH_MIN_NUMEL)]
    fresh = [u.clone() for u in iter_direction(params, 2, 0, generator=generator, distribution="rademacher")]
    src = DirectionSource(generator, distribution="rademacher")
    for a, b in zip(fresh, src.transient(params, 2, 0), strict=True):
        assert torch.equal(a, b)
        assert set(a.unique().tolist()) == {-1.0, 1.0}


def test_inverse_sqrt_scales_equal_the_dense_product(monkeypatch):
    monkeypatch.setattr(zo_estimators, "SCALE_CHUNK", 10)
    hs = [torch.rand(7, 5) + 0.1, torch.rand(3) + 0.1]
    scales = InverseSqrt(hs, [torch.float32, torch.float64])
    for i, h in enumerate(hs):
        u = torch.randn(h.shape, dtype=scales.dtypes[i])
        assert torch.equal(scales.scale_(i, u.clone()), u * h.rsqrt().to(u.dtype))
        assert torch.equal(scales[i], h.rsqrt().to(u.dtype))


def test_unknown_distribution_is_refused():
    with pytest.raises(ValueError, match="distribution"):
        DirectionSource(distribution="uniform")
    with pytest.raises(ValueError, match="distribution"):
        fill_(torch.empty(3), 0, 0, "cauchy")


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("use_scales", ["none", "list", "inverse_sqrt"])
def test_fused_perturbation_equals_the_transient_one(monkeypatch, cache, use_scales):
    # perturb_ adds large tensors piece by piece; the result must be exactly x + alpha * z from the transient stream,
    # for small and large tensors, a non-contiguous large one and a float64 one.
    monkeypatch.setattr(zo_estimators, "SCALE_CHUNK", 1000)
    big = zo_estimators.SCRATCH_MIN_NUMEL
    g = torch.Generator().manual_seed(0)
    params = [
        torch.randn(3, generator=g),
        torch.randn(big + 7, generator=g),
        torch.randn(4, big // 4, generator=g).t(),
        torch.randn(5, generator=g),
        torch.randn(big, generator=g, dtype=torch.float64),
    ]
    hs = [torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5 for p in params]
    scales = {
        "none": None,
        "list": [h.rsqrt() for h in hs],
        "inverse_sqrt": InverseSqrt(hs, [p.dtype for p in params]),
    }
    scales = scales[use_scales]
    src = DirectionSource(cache=cache)
    zs = [z.clone() for z in src.transient(params, 4, 1, scales)]
    expected = [p.clone().add_(z, alpha=0.3) for p, z in zip(params, zs, strict=True)]
    zo_estimators.perturb_(params, src, 4, 1, 0.3, scales)
    for p, e in zip(params, expected, strict=True):
        assert torch.equal(p, e)


@pytest.mark.parametrize("use_scales", ["none", "list", "inverse_sqrt"])
def test_piecewise_aggregation_equals_the_streamed_one(monkeypatch, use_scales):
    # Without the cache, the counter generator sums large tensors piece by piece; with it, tensor by tensor from the
    # cached directions. Both must give the same numbers, for small, large, non-contiguous and float64 tensors.
    monkeypatch.setattr(zo_estimators, "SCALE_CHUNK", 1000)
    big = zo_estimators.SCRATCH_MIN_NUMEL
    params = [
        torch.zeros(3),
        torch.zeros(big + 7),
        torch.zeros(big // 4, 4).t(),
        torch.zeros(5),
        torch.zeros(big, dtype=torch.float64),
        torch.zeros(2, 2),
    ]
    g = torch.Generator().manual_seed(1)
    hs = [torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5 for p in params]
    scales = {
        "none": None,
        "list": [h.rsqrt() for h in hs],
        "inverse_sqrt": InverseSqrt(hs, [p.dtype for p in params]),
    }
    scales = scales[use_scales]
    coeffs = torch.tensor([0.7, -1.3, 2.0])
    pieces = list(zo_estimators.aggregated_directions(params, 6, coeffs, scales, DirectionSource()))
    streamed = list(zo_estimators.aggregated_directions(params, 6, coeffs, scales, DirectionSource(cache=True)))
    for a, b in zip(pieces, streamed, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)
