import pytest
import torch
from conftest import tiny_bert, toy_dataset
from reference import dense_direction, reference_step

from hf_hiso import HiSoOptimizer, NonFiniteScalarError


def batch(n=8):
    ds = toy_dataset(n)
    return {k: torch.tensor(ds[k]) for k in ds.column_names}


def flat(params):
    return torch.cat([p.detach().flatten() for p in params])


@pytest.mark.parametrize("preconditioner", [True, False])
@pytest.mark.parametrize("difference", ["forward", "central"])
def test_fast_step_equals_dense_reference(preconditioner, difference):
    model = tiny_bert().eval()
    inputs = batch()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = HiSoOptimizer(
        [p for p in model.parameters() if p.requires_grad],
        lr=0.05,
        zo_eps=1e-3,
        num_directions=3,
        difference=difference,
        preconditioner=preconditioner,
        seed=11,
    )
    # A non-trivial H from an earlier step makes the check cover z = u / sqrt(H).
    loss_fn = lambda: model(**inputs).loss  # noqa: E731
    opt.step(loss_fn)
    h = torch.cat([h.flatten() for h in opt.hessian()]) if preconditioner else None
    seed = opt.current_seed()
    _, slopes, _ = opt.measure(loss_fn, seed)
    x_ref, h_ref, g_ref = reference_step(
        model,
        names,
        lambda call: call(**inputs).loss,
        seed,
        lr=0.05,
        mu=1e-3,
        num_directions=3,
        hessian=h,
        difference=difference,
        slopes=slopes,
    )
    torch.testing.assert_close(slopes.double(), g_ref.double(), rtol=1e-4, atol=1e-3)
    opt.accumulate(seed, slopes)
    opt.step()
    torch.testing.assert_close(flat(opt.params).double(), x_ref, rtol=0, atol=1e-6)
    if preconditioner:
        h_new = torch.cat([h.flatten() for h in opt.hessian()])
        torch.testing.assert_close(h_new.double(), h_ref, rtol=1e-5, atol=1e-9)


def test_preconditioner_off_is_plain_zo_sgd():
    x = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = HiSoOptimizer([x], lr=0.1, num_directions=2, preconditioner=False, seed=0)
    seed = opt.current_seed()
    u = [dense_direction([x.shape], seed, p) for p in range(2)]
    slopes = torch.tensor([0.3, -1.2])
    x0 = x.detach().clone()
    opt.accumulate(seed, slopes)
    opt.step()
    expected = x0 - 0.1 / 2 * (0.3 * u[0] - 1.2 * u[1])
    torch.testing.assert_close(x.detach(), expected)
    assert opt.hessian() is None and "hessian" not in opt.state[x]


def test_hessian_update_hand_checked():
    x = torch.nn.Parameter(torch.zeros(3))
    opt = HiSoOptimizer([x], lr=1.0, num_directions=2, hessian_smooth=0.9, hessian_damping=0.01, seed=0)
    seed = opt.current_seed()
    u0, u1 = (dense_direction([x.shape], seed, p) for p in range(2))
    opt.accumulate(seed, torch.tensor([2.0, 4.0]))
    opt.step()
    v = (2.0 * u0 + 4.0 * u1) / 2  # H = I before the update, so z = u
    torch.testing.assert_close(x.detach(), -v)
    h1 = 0.9 * 1.0 + 0.1 * (v**2 + 0.01)
    torch.testing.assert_close(opt.state[x]["hessian"], h1)
    # Second step: directions are now u / sqrt(H1).
    seed = opt.current_seed()
    w = dense_direction([x.shape], seed, 0) / h1.sqrt()
    w1 = dense_direction([x.shape], seed, 1) / h1.sqrt()
    opt.accumulate(seed, torch.tensor([1.0, -1.0]))
    opt.step()
    v2 = (w - w1) / 2
    torch.testing.assert_close(x.detach(), -v - v2)
    torch.testing.assert_close(opt.state[x]["hessian"], 0.9 * h1 + 0.1 * (v2**2 + 0.01))


def test_all_local_steps_applies_rule_per_step_with_fixed_h():
    x = torch.nn.Parameter(torch.zeros(4))
    opt = HiSoOptimizer([x], lr=0.5, num_directions=1, hessian_update="all_local_steps", hessian_damping=0.0)
    opt.accumulate(10, torch.tensor([1.0]))
    opt.accumulate(11, torch.tensor([2.0]))
    opt.step()
    v0 = dense_direction([x.shape], 10, 0)
    v1 = 2.0 * dense_direction([x.shape], 11, 0)
    torch.testing.assert_close(x.detach(), -0.5 * (v0 + v1))
    h = 0.95 * (0.95 + 0.05 * v0**2) + 0.05 * v1**2
    torch.testing.assert_close(opt.state[x]["hessian"], h)


def test_state_dict_round_trip_holds_preconditioner_and_step():
    x = torch.nn.Parameter(torch.zeros(5))
    opt = HiSoOptimizer([x], lr=0.1)
    opt.step(lambda: (x - 1).pow(2).sum())
    sd = opt.state_dict()
    y = torch.nn.Parameter(x.detach().clone())
    opt2 = HiSoOptimizer([y], lr=0.1)
    opt2.load_state_dict(sd)
    assert opt2.global_step == 1
    torch.testing.assert_close(opt2.state[y]["hessian"], opt.state[x]["hessian"])
    assert opt2.current_seed() == opt.current_seed()


def test_nonfinite_scalars_raise_and_leave_parameters():
    x = torch.nn.Parameter(torch.ones(3))
    opt = HiSoOptimizer([x], lr=0.1)
    with pytest.raises(NonFiniteScalarError, match="zo_skip_nonfinite"):
        opt.step(lambda: x.sum() * float("nan"))
    torch.testing.assert_close(x.detach(), torch.ones(3))
    opt = HiSoOptimizer([x], lr=0.1, skip_nonfinite=True)
    opt.step(lambda: x.sum() * float("inf"))
    torch.testing.assert_close(x.detach(), torch.ones(3))
    assert opt.state["hiso"]["skipped_steps"] == 1


def test_plain_pytorch_loop_decreases_loss():
    target = torch.linspace(-1, 1, 10)
    x = torch.nn.Parameter(torch.zeros(10))
    opt = HiSoOptimizer([x], lr=0.02, num_directions=4, seed=1)
    loss_fn = lambda: (x - target).pow(2).sum()  # noqa: E731
    start = float(loss_fn().detach())
    for _ in range(300):
        opt.step(loss_fn)
    assert float(loss_fn().detach()) < 0.2 * start
    assert x.grad is None


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"zo_eps": 0.0}, "zo_eps"),
        ({"num_directions": 0}, "num_directions"),
        ({"difference": "backward"}, "difference"),
        ({"hessian_smooth": 1.0}, "hessian_smooth"),
        ({"hessian_damping": -1.0}, "hessian_damping"),
        ({"hessian_update": "first"}, "hessian_update"),
        ({"generator": "tpu"}, "generator"),
        ({"distribution": "uniform"}, "distribution"),
        ({"cache_directions": "sometimes"}, "cache_directions"),
    ],
)
def test_invalid_settings(kwargs, field):
    with pytest.raises(ValueError, match=field):
        HiSoOptimizer([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def test_cached_and_regenerated_directions_give_the_same_steps():
    """The direction cache only saves generator work: three HiSo steps (H learned) land on the same parameters."""
    target = torch.linspace(-1, 1, 50)
    runs = {}
    for cache in (True, False):
        x = torch.nn.Parameter(torch.zeros(50))
        opt = HiSoOptimizer([x], lr=0.05, num_directions=3, seed=3, cache_directions=cache)
        assert opt.cache_directions is cache
        for _ in range(3):
            opt.step(lambda x=x: (x - target).pow(2).sum())
        runs[cache] = (x.detach().clone(), opt.state[x]["hessian"].clone())
    assert not torch.equal(runs[True][0], torch.zeros(50))
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=0, atol=0)
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=0, atol=0)


def test_auto_cache_follows_the_memory_budget(monkeypatch):
    """`"auto"` (the default) caches while P directions fit in CACHE_AUTO_BYTES, and regenerates beyond it."""
    import hf_hiso.zo_optimizer as zo

    params = [torch.nn.Parameter(torch.zeros(100)), torch.nn.Parameter(torch.zeros(20, dtype=torch.float64))]
    opt = HiSoOptimizer(params, num_directions=5)
    assert opt.direction_cache_bytes() == 5 * (100 * 4 + 20 * 8)
    assert opt.cache_directions is True
    monkeypatch.setattr(zo, "CACHE_AUTO_BYTES", opt.direction_cache_bytes() - 1)
    assert HiSoOptimizer(params, num_directions=5).cache_directions is False
    assert HiSoOptimizer(params, num_directions=5, cache_directions="true").cache_directions is True


@pytest.mark.parametrize("generator", ["counter", "cpu"])
def test_rademacher_step_uses_sign_directions(generator):
    x = torch.nn.Parameter(torch.zeros(70))
    opt = HiSoOptimizer(
        [x], lr=0.5, num_directions=2, preconditioner=False, generator=generator, distribution="rademacher"
    )
    seed = opt.current_seed()
    opt.accumulate(seed, torch.tensor([1.0, 3.0]))
    opt.step()
    u = [next(opt.source.direction([x], seed, p)) for p in range(2)]
    assert all(set(v.unique().tolist()) == {-1.0, 1.0} for v in u)
    if generator == "counter":
        torch.testing.assert_close(u[1], dense_direction([x.shape], seed, 1, distribution="rademacher"))
    torch.testing.assert_close(x.detach(), -0.5 / 2 * (u[0] + 3 * u[1]))


def _trained_state(**kwargs):
    x = torch.nn.Parameter(torch.zeros(5))
    opt = HiSoOptimizer([x], lr=0.1, **kwargs)
    opt.step(lambda: (x - 1).pow(2).sum())
    return opt.state_dict()


def test_checkpoint_of_other_directions_is_refused():
    sd = _trained_state(generator="cpu")
    assert sd["state"]["hiso"]["directions"] == "cpu/gaussian"
    y = torch.nn.Parameter(torch.zeros(5))
    with pytest.raises(ValueError, match="zo_generator='cpu'"):
        HiSoOptimizer([y], lr=0.1).load_state_dict(sd)
    with pytest.raises(ValueError, match="zo_distribution='rademacher'"):
        HiSoOptimizer([y], lr=0.1).load_state_dict(_trained_state(distribution="rademacher"))
    opt = HiSoOptimizer([y], lr=0.1, generator="cpu")
    opt.load_state_dict(sd)
    assert opt.global_step == 1


def test_checkpoint_from_before_the_counter_generator():
    # State written before the key existed was drawn by torch's generators ("cpu" by default): loadable by an
    # optimizer with generator="cpu" (which then records it), refused with a clear message by the counter default.
    sd = _trained_state(generator="cpu")
    del sd["state"]["hiso"]["directions"]
    y = torch.nn.Parameter(torch.zeros(5))
    with pytest.raises(ValueError, match="written by a version whose directions came from torch's generators"):
        HiSoOptimizer([y], lr=0.1).load_state_dict(sd)
    opt = HiSoOptimizer([y], lr=0.1, generator="cpu")
    opt.load_state_dict(sd)
    assert opt.state["hiso"]["directions"] == "cpu/gaussian"
    assert "directions" not in sd["state"]["hiso"]
