"""Estimators behind HiSoOptimizer's hooks (`hf_hiso.estimators`, `hf_hiso.experimental`): a dense reference of
each, exact replicas, catch-up, resume and ledger under the federation, and errors naming the field."""

import math
import warnings

import pytest
import torch
from conftest import hiso_args, tiny_bert
from reference import dense_direction
from test_callbacks import assert_ledger_formula, federated_trainer, fresh_optimizer

from hf_hiso import HiSoConfig, HiSoOptimizer
from hf_hiso.callbacks import FEDERATED_STATE_NAME
from hf_hiso.estimators import ZOEstimator, resolve_estimator
from hf_hiso.federated.protocol import replay
from hf_hiso.zo_estimators import DirectionSource, direction_seed, iter_direction

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from hf_hiso.experimental import NormalizedEstimator, SubsetEstimator

# (estimator, its settings, distribution, HiSo's preconditioner): each variant alone and a combination.
VARIANTS = {
    "normalized": ("normalized", {"beta": 0.8}, "gaussian", False),
    "rademacher": ("default", {}, "rademacher", False),
    "subset": ("subset", {"fraction": 0.5}, "gaussian", False),
    "all_with_hiso": ("normalized", {"beta": 0.5}, "rademacher", True),
    "subset_hiso_rademacher": ("subset", {"fraction": 0.3}, "rademacher", True),
}


def variant_args(tmp_path, name, **overrides):
    est, kwargs, dist, precond = VARIANTS[name]
    return hiso_args(
        tmp_path,
        zo_estimator=est,
        zo_estimator_kwargs=kwargs,
        zo_distribution=dist,
        zo_preconditioner=precond,
        **overrides,
    )


# ---- a dense reference --------------------------------------------------------------------------------------------


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.w1 = torch.nn.Parameter(torch.randn(5, 4, generator=gen, dtype=torch.float64))
        self.b1 = torch.nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64))
        self.w2 = torch.nn.Parameter(torch.randn(3, 5, generator=gen, dtype=torch.float64))
        self.b2 = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
        self.y = torch.randint(0, 3, (16,), generator=gen)

    def loss_at(self, tensors):
        w1, b1, w2, b2 = tensors
        return torch.nn.functional.cross_entropy(torch.tanh(self.x @ w1.T + b1) @ w2.T + b2, self.y)


def dense_reference(net, seeds, lr, mu, P, estimator, kwargs, distribution, preconditioner, beta_h=0.95):
    """The documented formulas on one flat float64 vector: z_p = f_p * u_p / sqrt(H), c = g (default) or
    g / RMS_EMA (normalized), x <- x - (lr / P) sum_p c_p z_p, H <- beta H + (1 - beta)(v**2 + eps)."""
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]
    x = torch.cat([p.detach().flatten() for p in net.parameters()])
    h = torch.ones_like(x)
    moment, count = 0.0, 0

    def f(vec):
        return float(net.loss_at([c.view(s) for c, s in zip(vec.split(sizes), shapes, strict=True)]))

    def u_of(seed, p):
        # The default (counter) generator's numbers, from the independent numpy reference.
        return dense_direction(shapes, seed, p, "counter", distribution).double()

    def factor_of(seed, p):
        if estimator != "subset":
            return torch.ones_like(x)
        blocks = len(shapes)
        k = max(1, round(kwargs["fraction"] * blocks))
        gen = torch.Generator().manual_seed(direction_seed(seed ^ 0x5B5E7, p))
        chosen = set(torch.randperm(blocks, generator=gen)[:k].tolist())
        return torch.cat([torch.full((n,), math.sqrt(blocks / k) * (b in chosen)) for b, n in enumerate(sizes)])

    for seed in seeds:
        zs = [factor_of(seed, p) * u_of(seed, p) / h.sqrt() for p in range(P)]
        f0 = f(x)
        g = torch.tensor([(f(x + mu * z) - f0) / mu for z in zs], dtype=torch.float64)
        if estimator == "normalized":
            beta = kwargs["beta"]
            moment, count = beta * moment + (1 - beta) * float(g.square().mean()), count + 1
            g = g / math.sqrt(moment / (1 - beta**count))
        v = sum(c * z for c, z in zip(g, zs, strict=True)) / P
        x = x - lr * v
        if preconditioner:
            h = beta_h * h + (1 - beta_h) * (v**2 + 1e-8)
    return x


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fast_estimator_equals_dense_reference(name):
    est, kwargs, dist, precond = VARIANTS[name]
    net = Net()
    start = [p.detach().clone() for p in net.parameters()]
    opt = HiSoOptimizer(
        net.parameters(), lr=0.1, num_directions=3, estimator=est, estimator_kwargs=kwargs,
        distribution=dist, preconditioner=precond, seed=5,
    )  # fmt: skip
    seeds = []
    for _ in range(4):
        seeds.append(opt.current_seed())
        opt.step(lambda: net.loss_at(list(net.parameters())))
    moved = torch.cat([p.detach().flatten() for p in opt.params])
    assert (moved - torch.cat([s.flatten() for s in start])).abs().max() > 1e-2  # it trained
    with torch.no_grad():
        for p, s in zip(net.parameters(), start, strict=True):
            p.copy_(s)
    x_ref = dense_reference(net, seeds, 0.1, 1e-3, 3, est, kwargs, dist, precond)
    # Slopes are kept as float32 scalars (what is sent): agreement to float32 precision of the slopes.
    torch.testing.assert_close(moved, x_ref, rtol=0, atol=1e-5)


def test_rademacher_directions_are_signs_and_the_same_everywhere():
    params = [torch.zeros(3, 70000), torch.zeros(17)]  # one tensor large enough for the scratch-buffer path
    for generator in ("counter", "cpu"):
        for cache in (False, True):
            src = DirectionSource(generator=generator, cache=cache, distribution="rademacher")
            fresh = list(iter_direction(params, 9, 2, None, generator, "rademacher"))
            for a, b in zip(fresh, src.transient(params, 9, 2), strict=True):
                assert torch.equal(a, b)
    u = torch.cat([t.flatten() for t in fresh])
    assert set(u.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(u.mean())) < 0.02  # about half of each sign
    gaussian = torch.cat([t.flatten() for t in iter_direction(params, 9, 2)])
    assert not torch.equal(gaussian.sign(), u)


def test_subset_blocks_are_seeded_and_rescaled():
    params = [torch.zeros(2) for _ in range(8)]
    est = SubsetEstimator(fraction=0.25)
    est.bind(params, [{"params": params}])
    rows = est.direction_factors({}, seed=7, num_directions=200)
    assert rows == est.direction_factors({}, seed=7, num_directions=200)
    assert rows != est.direction_factors({}, seed=8, num_directions=200)
    assert all(sum(f > 0 for f in row) == 2 for row in rows)
    # E[f**2] = 1 per block (unbiased): the empirical share of each block is k / B with factor**2 = B / k.
    mean_sq = torch.tensor(rows).square().mean(0)
    assert torch.allclose(mean_sq, torch.ones(8), atol=0.35)


def test_normalized_step_is_scale_free():
    """Multiplying the loss by 1000 leaves the normalised trajectory unchanged (up to rounding), and moves a plain
    step 1000 times further (up to the finite difference's curvature term)."""
    ends = {}
    for est in ("normalized", "default"):
        for scale in (1.0, 1000.0):
            net = Net()
            opt = HiSoOptimizer(net.parameters(), lr=0.01, num_directions=2, estimator=est, preconditioner=False)
            # One plain step (its length is linear in the loss's scale), three normalised ones.
            for _ in range(3 if est == "normalized" else 1):
                opt.step(lambda net=net, scale=scale: scale * net.loss_at(list(net.parameters())))
            ends[est, scale] = torch.cat([p.detach().flatten() for p in net.parameters()])
    start = torch.cat([p.detach().flatten() for p in Net().parameters()])
    torch.testing.assert_close(ends["normalized", 1.0], ends["normalized", 1000.0], rtol=0, atol=1e-4)
    ratio = (ends["default", 1000.0] - start).norm() / (ends["default", 1.0] - start).norm()
    assert 900 < float(ratio) < 1100


# ---- defaults unchanged --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preconditioner", [True, False])
def test_options_off_are_bit_identical(preconditioner):
    runs = []
    for kwargs in ({}, {"estimator": "default", "distribution": "gaussian"}, {"estimator": ZOEstimator()}):
        net = Net()
        opt = HiSoOptimizer(net.parameters(), lr=0.1, num_directions=3, preconditioner=preconditioner, **kwargs)
        for _ in range(3):
            opt.step(lambda net=net: net.loss_at(list(net.parameters())))
        runs.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


# ---- the federation: replicas, catch-up, resume, ledger -------------------------------------------------------------


def estimator_state(opt):
    return dict(opt.state["estimator"])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_replica_and_late_client_equal_the_server(tmp_path, name):
    args = variant_args(tmp_path, name, max_steps=5, zo_num_directions=3)
    trainer, cb = federated_trainer(
        tmp_path, args=args, num_clients=4, clients_per_round=2, local_steps=2, history_retention="all"
    )
    trainer.train()
    server = trainer.zo_optimizer
    assert server.estimator.name == VARIANTS[name][0]
    history = [cb.server.history[r] for r in sorted(cb.server.history)]
    replica = fresh_optimizer(tmp_path, tiny_bert(), args)
    replay(replica, history)
    late = fresh_optimizer(tmp_path, tiny_bert(), args)
    replay(late, history[:2])
    replay(late, history[2:])
    for opt in (replica, late):
        for a, b in zip(opt.params, server.params, strict=True):
            assert torch.equal(a, b)
        assert estimator_state(opt) == estimator_state(server)
        if VARIANTS[name][3]:
            assert all(torch.equal(a, b) for a, b in zip(opt.hessian(), server.hessian(), strict=True))
    if VARIANTS[name][0] == "normalized":
        assert server.state["estimator"]["count"] == 5 * 2  # one EMA update per aggregated local step


@pytest.mark.parametrize("name", ["normalized", "subset_hiso_rademacher"])
def test_resume_equals_uninterrupted(tmp_path, name):
    fed = {"num_clients": 4, "clients_per_round": 2, "local_steps": 2}
    full, _ = federated_trainer(tmp_path, args=variant_args(tmp_path / "full", name, max_steps=6), **fed)
    full.train()
    args = variant_args(tmp_path / "cut", name, max_steps=6, save_strategy="steps", save_steps=3)
    first, _ = federated_trainer(tmp_path, args=args, **fed)
    first.train()
    ckpt = tmp_path / "cut" / "out" / "checkpoint-3"
    assert (ckpt / FEDERATED_STATE_NAME).exists()
    resumed, _ = federated_trainer(tmp_path, model=tiny_bert(seed=9), args=args, **fed)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for a, b in zip(full.zo_optimizer.params, resumed.zo_optimizer.params, strict=True):
        assert torch.equal(a, b)
    assert estimator_state(full.zo_optimizer) == estimator_state(resumed.zo_optimizer)


def test_resume_with_another_estimator_is_refused():
    net = Net()
    opt = HiSoOptimizer(net.parameters(), estimator="normalized")
    opt.step(lambda: net.loss_at(list(net.parameters())))
    other = HiSoOptimizer(Net().parameters())
    with pytest.raises(ValueError, match="estimator 'normalized'.*'default'"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_ledger_counts_one_scalar_per_direction(tmp_path, name):
    clients, sampled, tau, P, rounds = 4, 2, 2, 3, 3
    args = variant_args(tmp_path, name, max_steps=rounds, zo_num_directions=P, per_device_train_batch_size=4)
    fed = {"num_clients": clients, "clients_per_round": sampled, "local_steps": tau}
    trainer, cb = federated_trainer(tmp_path, args=args, **fed)
    trainer.train()
    assert cb.ledger.scalars_per_direction == 1
    assert_ledger_formula(trainer, cb.ledger, args.seed, clients, sampled, tau, P, rounds)


# ---- selection and errors ------------------------------------------------------------------------------------------


def test_selection_by_name_class_or_object():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(HiSoOptimizer(params, estimator="normalized").estimator, NormalizedEstimator)
    by_class = HiSoOptimizer(params, estimator=NormalizedEstimator, estimator_kwargs={"beta": 0.5})
    assert by_class.estimator.config.beta == 0.5
    obj = SubsetEstimator(fraction=1.0)
    assert HiSoOptimizer(params, estimator=obj).estimator is obj
    assert HiSoOptimizer(params, estimator_kwargs='{"beta": 0.3}', estimator="normalized").estimator.config.beta == 0.3
    assert type(resolve_estimator(None)) is ZOEstimator


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"zo_estimator": "adam"}, r"`zo_estimator` must be one of \['default', 'normalized', 'subset'\]"),
        ({"zo_estimator": "normalized", "zo_estimator_kwargs": {"beta": 1.0}}, r"`zo_estimator_kwargs\['beta'\]`"),
        ({"zo_estimator": "normalized", "zo_estimator_kwargs": {"eps": -1}}, r"`zo_estimator_kwargs\['eps'\]`"),
        ({"zo_estimator": "subset", "zo_estimator_kwargs": {"fraction": 0}}, r"`zo_estimator_kwargs\['fraction'\]`"),
        ({"zo_estimator": "subset", "zo_estimator_kwargs": {"blocks": "layer"}}, r"`zo_estimator_kwargs\['blocks'\]`"),
        ({"zo_estimator": "subset", "zo_estimator_kwargs": {"beta": 0.5}}, r"`zo_estimator_kwargs` has unknown"),
        ({"zo_estimator_kwargs": "[1, 2]"}, r"`zo_estimator_kwargs` must be a dict or a JSON object"),
        ({"zo_distribution": "uniform"}, r"`zo_distribution` must be one of \('gaussian', 'rademacher'\)"),
        ({"zo_estimator": "normalized", "zo_curvature": True}, r"`zo_estimator` must be 'default' with `zo_curvature"),
    ],
)
def test_bad_settings_name_the_field(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        HiSoConfig(output_dir=str(tmp_path), report_to="none", **kwargs)


def test_bad_optimizer_settings_name_the_field():
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="`distribution`"):
        HiSoOptimizer(params, distribution="sphere")
    with pytest.raises(ValueError, match="`estimator` must be"):
        HiSoOptimizer(params, estimator=3)
    with pytest.raises(ValueError, match="`estimator_kwargs` must be empty"):
        HiSoOptimizer(params, estimator=NormalizedEstimator(), estimator_kwargs={"beta": 0.1})
    with pytest.raises(ValueError, match=r"`estimator_kwargs\['blocks'\]` has 2 entries for 1"):
        HiSoOptimizer(params, estimator="subset", estimator_kwargs={"blocks": [0, 1]})
