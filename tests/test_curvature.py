"""The block curvature preconditioner (hf_hiso.curvature): formulas against a dense reference, learning the truth on
quadratics, replicas, checkpoints, LoRA, local steps and the default staying off."""

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import hiso_args, tiny_bert, toy_dataset
from reference import dense_direction

from hf_hiso import FederatedZOCallback, HiSoConfig, HiSoOptimizer, HiSoTrainer
from hf_hiso.curvature import BlockCurvature
from hf_hiso.federated.protocol import FederatedServer, aggregate, replay, split_report
from hf_hiso.zo_optimizer import PendingUpdate

ROOT = Path(__file__).resolve().parents[1]


def quadratic(hs, params):
    """`f = 1/2 sum_b sum_i h_bi x_bi**2`: the true block curvature is `h_b.mean()`."""
    return lambda: sum(0.5 * (h * p * p).sum() for h, p in zip(hs, params, strict=True))


def make_params(sizes, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=g, dtype=dtype)) for n in sizes]


def test_off_by_default():
    opt = HiSoOptimizer([torch.nn.Parameter(torch.zeros(3))])
    assert opt.curvature is None and "curvature" not in opt.state and opt.block_hessian() is None
    assert HiSoConfig(output_dir="unused", report_to="none").zo_curvature is False
    assert HiSoConfig.zo_curvature is False


def test_curvature_step_equals_dense_reference():
    """Three directions, two tensors with a dense (non-diagonal) quadratic: after two steps (so that H is no longer
    I), the third step's scalars, update and regression state follow the module's formulas literally."""
    sizes, P, mu, lr = [3, 4], 3, 1e-3, 0.01
    params = make_params(sizes)
    g = torch.Generator().manual_seed(1)
    m = torch.randn(7, 7, generator=g, dtype=torch.float64)
    a_mat = m @ m.T / 7 + torch.diag(torch.tensor([0.1, 0.2, 0.3, 4.0, 5.0, 6.0, 7.0], dtype=torch.float64))

    def flat():
        return torch.cat([p.detach().flatten() for p in params])

    def f_of(x):
        return 0.5 * x @ a_mat @ x

    loss_fn = lambda: f_of(torch.cat([p.flatten() for p in params]))  # noqa: E731
    opt = HiSoOptimizer(params, lr=lr, zo_eps=mu, num_directions=P, curvature=True, curvature_forget=0.9, seed=3)
    opt.step(loss_fn)
    opt.step(loss_fn)
    state = opt.state["curvature"]
    assert state["rows"] == 2 * P
    h_blocks = state["hessian"].clone()
    assert not torch.equal(h_blocks, torch.ones(2, dtype=torch.float64))  # 2B = 4 rows reached: H follows theta
    gram, moment, weight = state["gram"].clone(), state["moment"].clone(), state["weight"]

    seed = opt.current_seed()
    est = opt.curvature
    factors = est.block_factors(seed, P)
    x = flat()
    zs, feats = [], []
    for p in range(P):
        u = dense_direction([torch.Size([n]) for n in sizes], seed, p).double()
        scale = torch.cat([torch.full((n,), float(factors[p, b] / h_blocks[b].sqrt())) for b, n in enumerate(sizes)])
        z = scale * u
        zs.append(z)
        feats.append(torch.stack([z[:3].square().sum(), z[3:].square().sum()]))
    f0 = f_of(x)
    g_ref = torch.stack([(f_of(x + mu * z) - f_of(x - mu * z)) / (2 * mu) for z in zs])
    c_ref = torch.stack([(f_of(x + mu * z) + f_of(x - mu * z) - 2 * f0) / mu**2 for z in zs])
    torch.testing.assert_close(c_ref, torch.stack([z @ a_mat @ z for z in zs]), rtol=1e-5, atol=1e-6)

    loss0, slopes, curvatures = opt.measure(loss_fn, seed)
    assert opt.last_forward_passes == 2 * P + 1
    torch.testing.assert_close(slopes.double(), g_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(curvatures.double(), c_ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(flat(), x, rtol=0, atol=1e-12)  # restored

    opt.accumulate(seed, slopes, curvatures)
    opt.step()
    x_ref = x - lr / P * sum(gp * z for gp, z in zip(slopes.double(), zs, strict=True))
    torch.testing.assert_close(flat(), x_ref, rtol=0, atol=1e-7)

    # Regression: R <- lambda R + X^T X, r <- lambda r + X^T c, N <- lambda N + P; theta from the literal formula.
    xf = torch.stack(feats)
    gram_ref = 0.9 * gram + xf.T @ xf
    moment_ref = 0.9 * moment + xf.T @ curvatures.double()
    torch.testing.assert_close(state["gram"], gram_ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(state["moment"], moment_ref, rtol=1e-6, atol=1e-9)
    n_eff = 0.9 * weight + P
    assert state["weight"] == pytest.approx(n_eff)
    pooled = moment_ref.sum() / gram_ref.sum()
    d = torch.diag(gram_ref.diagonal()) * (est.prior * 0.9**3 / n_eff)  # the prior fades with the third update
    theta_ref = torch.linalg.solve(gram_ref + d, moment_ref + d @ torch.full((2,), float(pooled), dtype=torch.float64))
    torch.testing.assert_close(state["theta"], theta_ref, rtol=1e-6, atol=1e-9)
    n = torch.tensor(sizes, dtype=torch.float64)
    pos = theta_ref.clamp_min(0)
    floored = pos.clamp_min(est.floor * (n * pos).sum() / n.sum())
    target = floored / ((n * floored).sum() / n.sum())
    # trust region: each block moves by at most a factor 2 per curvature step, then the mean over entries is 1 again
    moved = torch.minimum(torch.maximum(target, h_blocks / 2), h_blocks * 2)
    torch.testing.assert_close(state["hessian"], moved / ((n * moved).sum() / n.sum()), rtol=1e-6, atol=1e-9)


def test_block_factors_are_seeded_with_mean_square_one():
    est = BlockCurvature([0, 1, 2], [5, 5, 5], spread=0.75)
    a = est.block_factors(123, 4)
    torch.testing.assert_close(a, BlockCurvature([0, 1, 2], [5, 5, 5], spread=0.75).block_factors(123, 4))
    assert not torch.equal(a, est.block_factors(124, 4))
    many = torch.cat([est.block_factors(s, 5) for s in range(400)]).square()
    assert many.min() >= 0.25 - 1e-12 and many.max() <= 1.75 + 1e-12
    # mean of 6000 draws of U[0.25, 1.75] (std 0.43): within 5 standard errors of 1
    assert abs(float(many.mean()) - 1.0) < 5 * 0.433 / math.sqrt(many.numel())
    assert torch.equal(
        BlockCurvature([0], [5], spread=0.0).block_factors(123, 3), torch.ones(3, 1, dtype=torch.float64)
    )


def test_trust_region_limits_each_change_of_h():
    """Exact rows from theta = (1, 100) on two equal blocks: the target H ratio is 100, but each curvature step moves
    every block by at most a factor 2 (4 in ratio), so H gets there in steps, and keeps mean 1 over entries."""
    est = BlockCurvature([0, 1], [10, 10], floor=1e-3)
    state = est.init_state()
    g = torch.Generator().manual_seed(0)
    theta = torch.tensor([1.0, 100.0], dtype=torch.float64)
    ratios = []
    for _ in range(30):
        x = 5 + 10 * torch.rand(3, 2, generator=g, dtype=torch.float64)
        est.update(state, x, x @ theta)
        h = state["hessian"]
        ratios.append(float(h[1] / h[0]))
        assert float(h.mean()) == pytest.approx(1.0)
    assert ratios[0] == 1.0  # 3 rows < 2B = 4: H = I still
    changes = [b / a for a, b in zip([1.0] + ratios, ratios, strict=False)]
    assert max(changes) <= 4.0 + 1e-9
    # once the target is within reach, H is exactly the rule applied to theta (the trust region no longer binds)
    torch.testing.assert_close(state["hessian"], est.preconditioner(state["theta"]))
    assert ratios[-1] > 50


def _learn(curv_blocks, spread, steps=60, lr=0.0, seed=0, sizes=None, within=0.0):
    sizes = sizes or [50] * len(curv_blocks)
    g = torch.Generator().manual_seed(seed + 100)
    hs = [
        t * (1.0 + within * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1))
        for t, n in zip(curv_blocks, sizes, strict=True)
    ]
    params = make_params(sizes, seed)
    opt = HiSoOptimizer(params, lr=lr, num_directions=5, curvature=True, curvature_spread=spread, seed=seed)
    loss_fn = quadratic(hs, params)
    for _ in range(steps):
        opt.step(loss_fn)
    true = torch.stack([h.mean() for h in hs])
    theta = opt.block_hessian()["theta"]
    return theta, true, opt


def test_learns_block_curvature_of_a_quadratic():
    """Four decades of block curvature are recovered from the averaged second differences alone."""
    curv = [0.01, 0.1, 1.0, 10.0, 100.0]
    theta, true, opt = _learn(curv, spread=0.75, steps=60, lr=1e-4)
    assert (theta > 0).all()
    log_err = (theta.log10() - true.log10()).abs()
    assert float(torch.corrcoef(torch.stack([theta.log10(), true.log10()]))[0, 1]) > 0.99
    # Blocks above the floor (the ones that set H) are accurate; the flattest ones are pulled toward the pooled value
    # by the fading prior, which does not matter: they sit at the floor either way.
    n = opt.curvature.block_sizes
    above = true > opt.curvature.floor * (n * true).sum() / n.sum()
    assert float(log_err[above].max()) < 0.02, (theta, true)
    h = opt.block_hessian()["hessian"]
    assert float((n * h).sum() / n.sum()) == pytest.approx(1.0)  # normalised to mean 1 over entries
    torch.testing.assert_close(h[above] / h[above][-1], true[above] / true[above][-1], rtol=0.05, atol=0)
    assert torch.all(h[~above] == h.min())


def test_random_block_factors_help_when_blocks_are_large():
    """With large blocks and curvature that varies within each block, `||z_b||**2` alone barely varies between
    directions (chi-square spread sqrt(2 / n_b)), so the regression is nearly rank one; the seeded block factors fix
    that. Both estimates see the same directions' noise; only the factors differ."""
    curv = [0.5, 2.0, 8.0, 1.0, 0.1, 30.0]
    errs = {}
    for spread in (0.0, 0.75):
        theta, true, _ = _learn(curv, spread, steps=20, sizes=[4000] * len(curv), within=0.9)
        errs[spread] = float((theta.clamp_min(1e-6).log() - true.log()).abs().mean())
    assert errs[0.75] < 0.05
    assert errs[0.0] > 3 * errs[0.75], errs


def test_every_k_measures_a_share_of_steps_and_counts_passes():
    params = make_params([20, 20])
    hs = [torch.full((20,), 1.0, dtype=torch.float64), torch.full((20,), 10.0, dtype=torch.float64)]
    loss_fn = quadratic(hs, params)
    calls = {"n": 0}

    def counted():
        calls["n"] += 1
        return loss_fn()

    P, steps = 4, 90
    opt = HiSoOptimizer(params, lr=1e-3, num_directions=P, curvature=True, curvature_every=3, seed=5)
    curvature_steps = 0
    for _ in range(steps):
        seed = opt.current_seed()
        curvature_steps += opt.curvature.is_curvature_step(seed)
        before = calls["n"]
        opt.step(counted)
        expected = 2 * P + 1 if opt.curvature.is_curvature_step(seed) else P + 1
        assert calls["n"] - before == expected == opt.last_forward_passes
    # a seed-chosen third of the steps: binomial(90, 1/3) has std 4.5
    assert abs(curvature_steps - steps / 3) < 4 * math.sqrt(steps * 2 / 9)
    assert opt.state["curvature"]["updates"] == curvature_steps


@pytest.mark.parametrize("target", ["curvature", "snr", "energy"])
def test_state_dict_round_trip_and_wrong_blocks(target):
    params = make_params([10, 30])
    hs = [torch.full((10,), 1.0, dtype=torch.float64), torch.full((30,), 20.0, dtype=torch.float64)]
    opt = HiSoOptimizer(params, lr=1e-3, curvature=True, curvature_target=target, seed=1)
    for _ in range(5):
        opt.step(quadratic(hs, params))
    assert bool((opt.state["curvature"]["moment_grad"] > 0).all())
    sd = copy.deepcopy(opt.state_dict())  # as through torch.save / torch.load
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = HiSoOptimizer(copies, lr=1e-3, curvature=True, curvature_target=target, seed=1)
    opt2.load_state_dict(sd)
    for key in ("gram", "moment", "moment_grad", "rows_x", "rows_y", "rows_update", "theta", "gamma", "hessian"):
        torch.testing.assert_close(opt2.state["curvature"][key], opt.state["curvature"][key], rtol=0, atol=0)
    if target == "energy":
        assert opt.state["curvature"]["rows_x"].shape == (5 * opt.num_directions, 2)
    opt.step(quadratic(hs, params))
    opt2.step(quadratic(hs, copies))
    for a, b in zip(params, copies, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = HiSoOptimizer([torch.nn.Parameter(torch.zeros(20)) for _ in range(2)], curvature=True)
    with pytest.raises(ValueError, match="other blocks"):
        other.load_state_dict(copy.deepcopy(sd))
    plain = HiSoOptimizer([torch.nn.Parameter(torch.zeros(n)) for n in (10, 30)]).state_dict()
    with pytest.raises(ValueError, match="no curvature state"):
        HiSoOptimizer([torch.nn.Parameter(torch.zeros(n)) for n in (10, 30)], curvature=True).load_state_dict(plain)


def test_scalar_reduce_averages_curvatures_too():
    params = make_params([6, 6])
    hs = [torch.ones(6, dtype=torch.float64), torch.full((6,), 3.0, dtype=torch.float64)]
    opt = HiSoOptimizer(params, curvature=True, num_directions=2, seed=0)
    seen = []

    def reduce(t):
        seen.append(t.clone())
        return t

    opt.scalar_reduce = reduce
    opt.step(quadratic(hs, params))
    assert len(seen) == 2 and torch.isfinite(seen[1]).all()  # slopes, then curvature scalars


@pytest.mark.parametrize(
    "field, value",
    [
        ("zo_curvature_every", 0),
        ("zo_curvature_forget", 0.0),
        ("zo_curvature_floor", 0.0),
        ("zo_curvature_spread", 1.5),
        ("zo_curvature_prior", 0.0),
        ("zo_curvature_blocks", "layer"),
        ("zo_curvature_target", "gradient"),
        ("zo_curvature_steps", -1),
        ("zo_curvature_steps", 2.5),
    ],
)
def test_invalid_config(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        hiso_args(tmp_path, zo_curvature=True, **{field: value})


def _lora(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights="gaussian")
    return get_peft_model(model, config)


def test_trainer_logs_passes_and_resumes_with_the_curvature_state(tmp_path):
    kw = {"zo_curvature": True, "zo_num_directions": 3, "max_steps": 4}
    full = HiSoTrainer(model=tiny_bert(), args=hiso_args(tmp_path / "full", **kw), train_dataset=toy_dataset(32))
    full.train()
    logged = [h for h in full.state.log_history if "loss" in h]
    assert logged[0]["zo/forward_passes"] == 7  # 2P + 1: every step is a curvature step by default
    assert logged[-1]["zo/curvature_rows"] == 12
    opt = full.zo_optimizer
    assert opt.hessian() is None and torch.isfinite(opt.state["curvature"]["theta"]).all()

    args = hiso_args(tmp_path / "cut", save_strategy="steps", save_steps=2, **kw)
    HiSoTrainer(model=tiny_bert(), args=args, train_dataset=toy_dataset(32)).train()
    resumed = HiSoTrainer(model=tiny_bert(seed=7), args=args, train_dataset=toy_dataset(32))
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "out" / "checkpoint-2"))
    for a, b in zip(opt.params, resumed.zo_optimizer.params, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)
    assert resumed.zo_optimizer.state["curvature"]["rows"] == 12
    for key in ("gram", "moment", "theta"):
        torch.testing.assert_close(resumed.zo_optimizer.state["curvature"][key], opt.state["curvature"][key])


@pytest.mark.parametrize("target", ["curvature", "snr"])
def test_federated_lora_replica_rebuilt_from_history_with_curvature(tmp_path, target):
    """LoRA adapter + head, two local steps per round: seeds, averaged slopes and averaged curvature scalars rebuild
    the adapter and the curvature state exactly (H has left I, so the replay depends on it); the ledger counts two
    scalars per direction."""
    rounds, clients, sampled, tau, P = 4, 4, 2, 2, 3
    kw = {"max_steps": rounds, "zo_num_directions": P, "zo_curvature": True, "per_device_train_batch_size": 4}
    kw["zo_curvature_target"] = target
    callback = FederatedZOCallback(
        num_clients=clients, clients_per_round=sampled, local_steps=tau, partition="iid", history_retention="all"
    )
    trainer = HiSoTrainer(
        model=_lora(tiny_bert()), args=hiso_args(tmp_path, **kw), train_dataset=toy_dataset(32), callbacks=[callback]
    )
    trainer.train()
    opt = trainer.zo_optimizer
    trained_state = opt.state["curvature"]
    assert opt.curvature.num_blocks == len([p for p in trainer.model.parameters() if p.requires_grad])
    assert trained_state["rows"] == rounds * tau * P >= 2 * opt.curvature.num_blocks
    assert not torch.equal(trained_state["hessian"], torch.ones_like(trained_state["hessian"]))
    history = [callback.server.history[r] for r in sorted(callback.server.history)]
    assert all(h.curvatures is not None and torch.isfinite(h.curvatures).all() for h in history)

    replica_trainer = HiSoTrainer(
        model=_lora(tiny_bert()), args=hiso_args(tmp_path / "replica", **kw), train_dataset=toy_dataset(8)
    )
    replica_trainer.create_optimizer()
    replica = replica_trainer.zo_optimizer
    replay(replica, history)
    for a, b in zip(replica.params, opt.params, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)
    for key in ("gram", "moment", "moment_grad", "theta", "gamma", "hessian"):
        torch.testing.assert_close(replica.state["curvature"][key], trained_state[key], rtol=1e-9, atol=0)
    assert callback.ledger.scalars_per_direction == 2
    assert callback.ledger.bytes_uplink_total == rounds * sampled * tau * P * 2 * 4


def test_federated_ledger_counts_curvature_scalars_on_curvature_steps_only(tmp_path):
    """`zo_curvature_every=2`, two local steps: each round's uplink is `P * (tau + k)` scalars per reporting client,
    `k` the round's curvature steps, which every party derives from the seeds."""
    rounds, tau, P = 6, 2, 3
    kw = {"max_steps": rounds, "zo_num_directions": P, "zo_curvature": True, "zo_curvature_every": 2}
    callback = FederatedZOCallback(num_clients=3, clients_per_round=2, local_steps=tau, history_retention="all")
    trainer = HiSoTrainer(
        model=tiny_bert(), args=hiso_args(tmp_path, **kw), train_dataset=toy_dataset(32), callbacks=[callback]
    )
    trainer.train()
    est = trainer.zo_optimizer.curvature
    steps = [sum(est.is_curvature_step(s) for s in callback.server.history[r].seeds) for r in range(rounds)]
    assert 0 < sum(steps) < rounds * tau  # some steps measure curvature, some do not
    assert callback.ledger.bytes_uplink_total == sum(2 * P * (tau + k) * 4 for k in steps)


@pytest.mark.parametrize("target", ["curvature", "snr", "energy"])
def test_protocol_with_every_k_replays_exactly(target):
    """The protocol by hand (no Trainer): forward differences with `curvature_every=2`, two local steps, clients
    with different losses; steps that measure no curvature send placeholders that never reach the state. A replica
    replaying the history holds the same parameters and curvature state."""
    sizes, P, tau = [10, 20, 30], 3, 2
    hs = [torch.full((n,), c, dtype=torch.float64) for n, c in zip(sizes, (0.1, 1.0, 10.0), strict=True)]
    shifts = [torch.linspace(-1, 1, sum(sizes), dtype=torch.float64) * (c + 1) for c in range(3)]

    def client_loss(params, c):
        def loss():
            x = torch.cat([p.flatten() for p in params]) - shifts[c]
            return 0.5 * (torch.cat(hs) * x * x).sum()

        return loss

    def make():
        params = make_params(sizes)
        return params, HiSoOptimizer(
            params, lr=1e-3, num_directions=P, curvature=True, curvature_every=2, curvature_target=target, seed=0
        )

    params, opt = make()
    server = FederatedServer(3, 2, local_steps=tau, seed=0, history_retention="all")
    measured_any = set()
    for _ in range(12):
        plan = server.plan_round()
        start = [p.detach().clone() for p in params]
        reports = {}
        for c in plan.clients:
            report = torch.zeros(tau, 2 * P)
            for k, seed in enumerate(plan.seeds):
                _, slopes, curvatures = opt.measure(client_loss(params, c), seed)
                measured = opt.curvature.is_curvature_step(seed)
                measured_any.add(measured)
                assert torch.isfinite(curvatures).all() == measured
                report[k, :P] = slopes
                report[k, P:] = curvatures if measured else 0.0
                if k < tau - 1:
                    opt.apply_updates([PendingUpdate(seed, slopes)], update_hessian=False)
            reports[c] = report
            with torch.no_grad():
                for p, s0 in zip(params, start, strict=True):
                    p.copy_(s0)
        measured = [opt.curvature.is_curvature_step(seed) for seed in plan.seeds]
        slopes, curvatures = split_report(aggregate(reports).scalars, P, measured)
        assert torch.isnan(curvatures[[not m for m in measured]]).all()
        for k, seed in enumerate(plan.seeds):
            opt.accumulate(seed, slopes[k], curvatures[k])
        opt.step()
        server.commit_round(plan, slopes, [1e-3], curvatures)
    assert measured_any == {True, False}
    state = opt.state["curvature"]
    assert 0 < state["updates"] < 12 * tau and state["skipped_rows"] == 0

    replica_params, replica = make()
    # H has left I, so the replay below depends on the learned state (theta, and gamma for "snr" and "energy")
    assert not torch.equal(state["hessian"], torch.ones_like(state["hessian"]))
    replay(replica, [server.history[r] for r in sorted(server.history)])
    for a, b in zip(replica_params, params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for key in ("gram", "moment", "moment_grad", "theta", "gamma", "hessian"):
        torch.testing.assert_close(replica.state["curvature"][key], state[key], rtol=0, atol=0)


@pytest.mark.slow
def test_quadratic_benchmark_quick(tmp_path):
    png = tmp_path / "q.png"
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quadratic.py"), "--quick", "--plot", str(png)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| block | block |" in out.stdout and png.stat().st_size > 0


# ---- signal-to-curvature target (curvature_target="snr") ----------------------------------------------------------


def _exact_rows(est, theta, gamma, updates, seed=0):
    """Feeds `updates` curvature steps of exact rows: `c = x theta` and slopes with `g**2 = x gamma` (random signs)."""
    state = est.init_state()
    g = torch.Generator().manual_seed(seed)
    for _ in range(updates):
        x = 5 + 10 * torch.rand(3, len(theta), generator=g, dtype=torch.float64)
        signs = torch.randint(0, 2, (3,), generator=g).double() * 2 - 1
        est.update(state, x, x @ theta, signs * (x @ gamma).sqrt())
    return state


def test_gamma_is_recovered_from_exact_squared_slopes():
    """The squared slopes obey `E[g**2 | z] = sum_b gamma_b x_b`; on exact rows the same regression as for `theta`
    (same gram, same shrinkage) recovers `gamma`, and the default target learns it too without using it for H."""
    theta = torch.tensor([1.0, 100.0, 10.0], dtype=torch.float64)
    gamma = torch.tensor([2.0, 0.5, 30.0], dtype=torch.float64)
    for target in ("curvature", "snr"):
        # a weak prior: all-positive features are strongly collinear, so shrinkage bias shows up in small blocks
        est = BlockCurvature([0, 1, 2], [10, 20, 30], target=target, prior=1e-6)
        state = _exact_rows(est, theta, gamma, 40)
        torch.testing.assert_close(state["theta"], theta, rtol=1e-2, atol=0)
        torch.testing.assert_close(state["gamma"], gamma, rtol=1e-2, atol=0)
    # the curvature target with the old call (no slopes) leaves the gradient moment alone
    est = BlockCurvature([0, 1], [10, 10])
    state = est.init_state()
    x = torch.tensor([[1.0, 2.0], [3.0, 1.0]], dtype=torch.float64)
    est.update(state, x, x @ theta[:2])
    assert torch.equal(state["moment_grad"], torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="snr"):
        BlockCurvature([0, 1], [10, 10], target="snr").update(est.init_state(), x, x @ theta[:2])


def test_snr_target_gives_long_directions_to_the_most_signal_per_curvature():
    """Three equal blocks, theta = (1, 100, 10), gamma = (1, 1000, 1): w = gamma / theta = (1, 10, 0.1), so H is
    proportional to (1, 0.1, 10), scaled so that sum_b theta_b / H_b = sum_b theta_b (the trace of plain directions):
    the stiffest block (1) gets the longest directions because its gradient is larger still, where the curvature
    target makes it the shortest."""
    theta = torch.tensor([1.0, 100.0, 10.0], dtype=torch.float64)
    gamma = torch.tensor([1.0, 1000.0, 1.0], dtype=torch.float64)
    est = BlockCurvature([0, 1, 2], [10, 10, 10], target="snr", prior=1e-6)
    inverse = torch.tensor([1.0, 0.1, 10.0], dtype=torch.float64)
    expected = inverse * float((theta / inverse).sum() / theta.sum())
    torch.testing.assert_close(est.snr_preconditioner(theta, gamma), expected)
    state = _exact_rows(est, theta, gamma, 40)
    torch.testing.assert_close(state["hessian"], expected, rtol=2e-2, atol=0)
    assert int(state["hessian"].argmin()) == 1
    curv = _exact_rows(BlockCurvature([0, 1, 2], [10, 10, 10], prior=1e-6), theta, gamma, 40)
    assert int(curv["hessian"].argmax()) == 1
    # the floors: a block without signal gets the largest H allowed (1 / (floor * mean w)), not infinity
    no_signal = est.snr_preconditioner(theta, torch.tensor([1.0, 1000.0, 0.0], dtype=torch.float64))
    w = torch.tensor([1.0, 10.0, 0.0], dtype=torch.float64)
    w = w.clamp_min(est.floor * float(w.mean()))
    torch.testing.assert_close(no_signal, (1 / w) * float((theta * w).sum() / theta.sum()))
    # the stable learning rate is that of plain directions: the trace sum_b n_b theta_b / H_b is unchanged
    learned = state["theta"]
    assert float((learned / state["hessian"]).sum()) == pytest.approx(float(learned.sum()), rel=1e-9)
    assert est.snr_preconditioner(theta, torch.zeros(3, dtype=torch.float64)) is None


def test_old_checkpoint_without_gradient_moment():
    """A curvature state saved before `moment_grad` existed loads with the curvature target (the moment starts at
    zero) and is refused with the snr target, which would otherwise act on a gamma it never learned."""
    params = make_params([10, 30])
    hs = [torch.full((10,), 1.0, dtype=torch.float64), torch.full((30,), 20.0, dtype=torch.float64)]
    opt = HiSoOptimizer(params, lr=1e-3, curvature=True, seed=1)
    opt.step(quadratic(hs, params))
    sd = copy.deepcopy(opt.state_dict())
    curv = sd["state"]["curvature"]
    del curv["moment_grad"], curv["gamma"]
    old = HiSoOptimizer(make_params([10, 30]), lr=1e-3, curvature=True, seed=1)
    old.load_state_dict(copy.deepcopy(sd))
    assert torch.equal(old.state["curvature"]["moment_grad"], torch.zeros(2, dtype=torch.float64))
    snr = HiSoOptimizer(make_params([10, 30]), lr=1e-3, curvature=True, curvature_target="snr", seed=1)
    with pytest.raises(ValueError, match="moment_grad"):
        snr.load_state_dict(copy.deepcopy(sd))
    # A state saved before the energy target (no kept rows) resumes with the snr target, gamma intact, and is refused
    # with the energy target, whose regression rows it never had.
    snr_opt = HiSoOptimizer(params, lr=1e-3, curvature=True, curvature_target="snr", seed=1)
    snr_opt.step(quadratic(hs, params))
    before = copy.deepcopy(snr_opt.state_dict())
    for key in ("rows_x", "rows_y", "rows_update"):
        del before["state"]["curvature"][key]
    resumed = HiSoOptimizer(make_params([10, 30]), lr=1e-3, curvature=True, curvature_target="snr", seed=1)
    resumed.load_state_dict(copy.deepcopy(before))
    assert torch.equal(resumed.state["curvature"]["gamma"], snr_opt.state["curvature"]["gamma"])
    assert torch.isfinite(resumed.state["curvature"]["gamma"]).all()
    energy = HiSoOptimizer(make_params([10, 30]), lr=1e-3, curvature=True, curvature_target="energy", seed=1)
    with pytest.raises(ValueError, match="rows_x"):
        energy.load_state_dict(copy.deepcopy(before))


# ---- gradient-energy target (curvature_target="energy") and learning H for a limited number of steps --------------


def test_energy_target_gives_short_directions_to_blocks_with_little_gradient_energy():
    """Blocks of 10, 100 and 1,000 entries; the large block is flat and almost gradient-free (a LoRA adapter at its
    B = 0 start): gamma / theta is the same for all three, so the snr target leaves H flat, while the energy target
    makes H_b inversely proportional to n_b gamma_b (scaled to keep the trace of plain directions)."""
    sizes = torch.tensor([10.0, 100.0, 1000.0], dtype=torch.float64)
    theta = torch.tensor([1.0, 0.1, 1e-4], dtype=torch.float64)
    gamma = torch.tensor([0.1, 0.01, 1e-5], dtype=torch.float64)
    energy = BlockCurvature([0, 1, 2], sizes.long().tolist(), target="energy", prior=1e-6)
    snr = BlockCurvature([0, 1, 2], sizes.long().tolist(), target="snr", prior=1e-6)
    h_snr = snr.snr_preconditioner(theta, gamma)
    torch.testing.assert_close(h_snr, torch.full_like(h_snr, float(h_snr[0])))
    inverse = 1.0 / (sizes * gamma)  # 1, 1, 100
    expected = inverse * float((sizes * theta / inverse).sum() / (sizes * theta).sum())
    h = energy.energy_preconditioner(theta, gamma)
    torch.testing.assert_close(h, expected)
    assert float(h[2] / h[0]) == pytest.approx(100.0)
    # the floor: a block without gradient energy gets 1 / floor times the largest block's H, not infinity
    none = energy.energy_preconditioner(theta, torch.tensor([0.1, 0.01, -1.0], dtype=torch.float64))
    assert float(none[2] / none[0]) == pytest.approx(1.0 / energy.floor)
    assert energy.energy_preconditioner(theta, torch.zeros(3, dtype=torch.float64)) is None
    assert energy.energy_preconditioner(-theta, gamma) is None
    # learned from exact rows, through the trust region
    state = _exact_rows(energy, theta, gamma, 60)
    torch.testing.assert_close(state["hessian"], expected, rtol=2e-2, atol=0)
    # the kept rows: those whose forgetting weight forget**age is still >= 1e-4 (with forget 0.5: ages 0 to 13)
    forgetful = BlockCurvature([0, 1, 2], sizes.long().tolist(), target="energy", forget=0.5)
    short = _exact_rows(forgetful, theta, gamma, 30)
    assert short["rows_x"].shape == (14 * 3, 3) and short["rows_update"].min() == 30 - 13


def test_curvature_steps_learn_h_then_keep_it():
    """`curvature_steps=N`: the first N curvature steps are measured with central differences and move H; after
    them every step is a plain forward-difference step (P + 1 passes, no block factors) with the learned H, and the
    state stops changing. A checkpoint taken after the switch resumes in the same mode."""
    params = make_params([20, 20])
    hs = [torch.full((20,), 1.0, dtype=torch.float64), torch.full((20,), 10.0, dtype=torch.float64)]
    P, N = 3, 12
    opt = HiSoOptimizer(params, lr=1e-3, num_directions=P, curvature=True, curvature_steps=N, seed=5)
    passes, learned = [], None
    for t in range(N + 6):
        seed = opt.current_seed()
        if t == N:
            learned = copy.deepcopy(opt.state["curvature"])
            assert not opt.curvature.is_curvature_step(seed, opt.state["curvature"])
            assert torch.equal(opt.curvature.block_factors(seed, P, opt.state["curvature"]), torch.ones(P, 2).double())
        opt.step(quadratic(hs, params))
        passes.append(opt.last_forward_passes)
    assert passes == [2 * P + 1] * N + [P + 1] * 6
    state = opt.state["curvature"]
    assert state["updates"] == N and state["rows"] == N * P
    assert float(state["hessian"][1] / state["hessian"][0]) > 2  # learned: the stiff block has the larger H
    for key in ("gram", "theta", "hessian"):
        assert torch.equal(state[key], learned[key])
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = HiSoOptimizer(copies, lr=1e-3, num_directions=P, curvature=True, curvature_steps=N, seed=5)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.step(quadratic(hs, params))
    resumed.step(quadratic(hs, copies))
    assert resumed.last_forward_passes == P + 1
    for a, b in zip(params, copies, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_federated_energy_target_with_curvature_steps_replays_and_counts_bytes(tmp_path):
    """A federation (two local steps a round) that learns H with the energy target on its first 4 curvature steps:
    rounds 0 and 1 carry the curvature scalars, later rounds only slopes (the ledger counts `P * (tau + k)` scalars
    per client, `k` = 2, 2, 0, 0, 0), and a replica rebuilt from the history holds the same model and state."""
    rounds, tau, P = 5, 2, 3
    kw = {"max_steps": rounds, "zo_num_directions": P, "zo_curvature": True, "per_device_train_batch_size": 4}
    kw |= {"zo_curvature_target": "energy", "zo_curvature_steps": 4}
    callback = FederatedZOCallback(num_clients=3, clients_per_round=2, local_steps=tau, history_retention="all")
    trainer = HiSoTrainer(
        model=_lora(tiny_bert()), args=hiso_args(tmp_path, **kw), train_dataset=toy_dataset(32), callbacks=[callback]
    )
    trainer.train()
    state = trainer.zo_optimizer.state["curvature"]
    assert state["updates"] == 4 and state["rows"] == 4 * P
    history = [callback.server.history[r] for r in sorted(callback.server.history)]
    assert [h.curvatures is not None and bool(torch.isfinite(h.curvatures).any()) for h in history] == [
        True,
        True,
        False,
        False,
        False,
    ]
    assert callback.ledger.bytes_uplink_total == sum(2 * P * (tau + k) * 4 for k in (2, 2, 0, 0, 0))
    replica_trainer = HiSoTrainer(
        model=_lora(tiny_bert()), args=hiso_args(tmp_path / "replica", **kw), train_dataset=toy_dataset(8)
    )
    replica_trainer.create_optimizer()
    replica = replica_trainer.zo_optimizer
    replay(replica, history)
    for a, b in zip(replica.params, trainer.zo_optimizer.params, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)
    for key in ("gram", "moment_grad", "gamma", "hessian"):
        torch.testing.assert_close(replica.state["curvature"][key], state[key], rtol=1e-9, atol=0)


def test_energy_target_masks_and_weighted_regression_find_a_block_with_a_ten_thousandth_of_the_energy():
    """The energy target's design: block factors are masks (`a**2` is 0 or 2, mean 1) and the squared slopes are
    regressed with weights `1 / predicted**2`. Four large blocks holding 1e-4 of the gradient energy beside a small
    block holding the rest (a LoRA adapter at its start beside the head): after 60 curvature steps of Gaussian slopes
    every large block has H at least 30 times the small block's (the truth is 1e4, the floor 1e3)."""
    sizes = [2000] * 4 + [200]
    n = torch.tensor(sizes, dtype=torch.float64)
    gamma = torch.tensor([1e-8] * 4 + [1e-3], dtype=torch.float64)
    theta = torch.tensor([1e-5] * 4 + [1e-2], dtype=torch.float64)
    est = BlockCurvature(list(range(5)), sizes, target="energy")
    masks = torch.cat([est.block_factors(seed, 5) for seed in range(200)]).square()
    assert bool(((masks == 0) | (masks - 2).abs().lt(1e-12)).all()) and abs(float(masks.mean()) - 1.0) < 0.05
    gen = torch.Generator().manual_seed(0)
    state = est.init_state()
    for step in range(60):
        a2 = est.block_factors(1000 + step, 5, state).square()
        chi = n * (1 + (2 / n).sqrt() * torch.randn(5, 5, generator=gen, dtype=torch.float64))
        x = a2 * chi / state["hessian"]
        dots = torch.randn(5, 5, generator=gen, dtype=torch.float64) * (gamma * chi).sqrt()
        slopes = (a2.sqrt() / state["hessian"].sqrt() * dots).sum(1)
        est.update(state, x, x @ theta, slopes)
    h = state["hessian"]
    assert float((h[:4] / h[4]).min()) >= 30.0
    # the fit is the reweighted one over the kept rows, not the unweighted fit of the same rows
    assert state["rows_x"].shape == (60 * 5, 5)
    assert not torch.allclose(state["gamma"], est.solve(state["gram"], state["moment_grad"], 0.0))


# ---- one block per role ------------------------------------------------------------------------------------------


def test_role_blocks_group_the_same_tensor_of_every_layer(tmp_path):
    """`zo_curvature_blocks="role"`: HiSoTrainer maps each trainable parameter to its name without layer numbers, so
    a LoRA adapter on query/value of a 2-layer model plus the head has 6 blocks (query/value x A/B, head weight and
    bias) instead of 10; the optimizer alone refuses the bare string, which it cannot resolve without names."""
    from hf_hiso.curvature import role_blocks, role_of

    assert role_of("bert.encoder.layer.11.attention.self.query.lora_A.default.weight") == (
        "bert.encoder.layer.attention.self.query.lora_A.default.weight"
    )
    assert role_of("model.layers.0") == "model.layers" and role_of("classifier.weight") == "classifier.weight"
    model = _lora(tiny_bert())
    roles = role_blocks(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 10 and len(set(roles.values())) == 6
    kw = {"max_steps": 2, "zo_num_directions": 3, "zo_curvature": True, "zo_curvature_blocks": "role"}
    trainer = HiSoTrainer(model=model, args=hiso_args(tmp_path, **kw), train_dataset=toy_dataset(16))
    trainer.train()
    est = trainer.zo_optimizer.curvature
    assert est.num_blocks == 6 and int(est.block_sizes.sum()) == sum(p.numel() for p in trainable)
    assert trainer.optimizer_cls_and_kwargs[1]["curvature_blocks"] == "role"  # the config is left as it was
    with pytest.raises(ValueError, match="role_blocks"):
        HiSoOptimizer(trainable, curvature=True, curvature_blocks="role")
    with pytest.raises(ValueError, match="no block for 1 of the 10"):
        HiSoOptimizer(trainable, curvature=True, curvature_blocks=dict.fromkeys(trainable[1:], "x"))
