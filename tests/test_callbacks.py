import pytest
import torch
from conftest import hiso_args, tiny_bert, toy_dataset
from reference import dense_direction

from hf_hiso import FederatedZOCallback, HiSoTrainer
from hf_hiso.callbacks import FEDERATED_STATE_NAME, ClientBatches
from hf_hiso.federated.protocol import FederatedServer, replay


def federated_trainer(tmp_path, model=None, data=None, args=None, **fed):
    callback = FederatedZOCallback(**{"num_clients": 3, "clients_per_round": 2, "partition": "iid", **fed})
    trainer = HiSoTrainer(
        model=model or tiny_bert(),
        args=args or hiso_args(tmp_path, max_steps=5),
        train_dataset=data or toy_dataset(32),
        callbacks=[callback],
    )
    return trainer, callback


def assert_ledger_formula(trainer, ledger, seed, clients, sampled, tau, P, rounds):
    """The ledger's totals against ALGORITHM.md section 4 (float32 scalars, 64-bit seeds), with the missed rounds
    of each sampled client replayed on a fresh server of the same seed."""
    d = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert ledger.bytes_uplink_total == rounds * sampled * tau * P * 4
    # downlink: this round's seeds per sampled client, plus seeds and averaged scalars of every missed round
    server = FederatedServer(clients, sampled, tau, seed=seed)
    expected_down = 0
    for _ in range(rounds):
        plan = server.plan_round()
        for c in plan.clients:
            expected_down += tau * 8 + len(server.missed_rounds(c)) * (tau * 8 + tau * P * 4)
        server.commit_round(plan, torch.zeros(tau, P), [0.0])
    assert ledger.bytes_downlink_total == expected_down
    assert ledger.fedavg_bytes_total == rounds * sampled * 2 * d * 4
    assert ledger.paper_bytes_total == rounds * sampled * 2 * tau * P * 4


def params_of(model):
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def fresh_optimizer(tmp_path, model, args=None):
    trainer = HiSoTrainer(model=model, args=args or hiso_args(tmp_path / "replica"), train_dataset=toy_dataset(8))
    trainer.create_optimizer()
    return trainer.zo_optimizer


def test_one_client_one_step_equals_centralized(tmp_path):
    data = toy_dataset(16)
    args = hiso_args(tmp_path / "c", per_device_train_batch_size=16, max_steps=4)
    central = HiSoTrainer(model=tiny_bert(), args=args, train_dataset=data)
    central.train()
    fed, _ = federated_trainer(
        tmp_path,
        data=data,
        args=hiso_args(tmp_path / "f", per_device_train_batch_size=16, max_steps=4),
        num_clients=1,
        clients_per_round=1,
        local_steps=1,
    )
    fed.train()
    for a, b in zip(params_of(central.model), params_of(fed.model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for a, b in zip(central.zo_optimizer.hessian(), fed.zo_optimizer.hessian(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    lc = [h["loss"] for h in central.state.log_history if "loss" in h]
    lf = [h["loss"] for h in fed.state.log_history if "loss" in h]
    assert lc == pytest.approx(lf, rel=1e-5)


def test_preconditioner_off_is_decomfl(tmp_path):
    """An independent DeComFL loop (dense directions, the protocol's formulas) reproduces the trained model."""
    data = toy_dataset(24)
    args = hiso_args(
        tmp_path,
        max_steps=4,
        zo_preconditioner=False,
        zo_num_directions=2,
        per_device_train_batch_size=4,
        lr_scheduler_type="constant",
    )
    trainer, cb = federated_trainer(tmp_path, data=data, args=args, num_clients=3, clients_per_round=2)
    trainer.train()
    assert trainer.zo_optimizer.hessian() is None

    model = tiny_bert().eval()
    server = FederatedServer(3, 2, 1, seed=args.seed)
    shards = [c.dataset for c in cb.clients]
    clients = [ClientBatches(s, trainer.data_collator, 4, args.seed, i) for i, s in enumerate(shards)]
    params = dict(model.named_parameters())
    ordered = _optimizer_names(tmp_path, args)  # directions are drawn tensor by tensor in the optimizer's order
    shapes = [params[n].shape for n in ordered]
    mu, lr, P = args.zo_eps, args.learning_rate, 2
    for _ in range(4):
        plan = server.plan_round()
        (seed,) = plan.seeds
        us = [dense_direction(shapes, seed, p) for p in range(P)]
        gs = []
        for c in plan.clients:
            batch = clients[c].next_batch()
            x = torch.cat([params[n].detach().flatten() for n in ordered])

            def f(vec, batch=batch):
                _assign(params, ordered, vec)
                with torch.no_grad():
                    return float(model(**batch).loss)

            f0 = f(x)
            gs.append([(f(x + mu * u) - f0) / mu for u in us])
            _assign(params, ordered, x)
        gbar = torch.tensor(gs).mean(0)
        x = torch.cat([params[n].detach().flatten() for n in ordered])
        _assign(params, ordered, x - lr / P * sum(g * u for g, u in zip(gbar, us, strict=True)))
        server.commit_round(plan, gbar[None], [lr])
    trained = dict(trainer.model.named_parameters())
    for n in ordered:
        torch.testing.assert_close(params[n].detach(), trained[n].detach(), rtol=0, atol=2e-5, msg=n)


def _optimizer_names(tmp_path, args):
    model = tiny_bert()
    opt = fresh_optimizer(tmp_path, model, args)
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in opt.params]


def _assign(params, names, vec):
    with torch.no_grad():
        offset = 0
        for n in names:
            p = params[n]
            p.copy_(vec[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def test_replica_rebuilt_from_history_alone(tmp_path):
    args = hiso_args(tmp_path, max_steps=6, zo_num_directions=3)
    trainer, cb = federated_trainer(
        tmp_path, args=args, num_clients=4, clients_per_round=2, local_steps=2, history_retention="all"
    )
    trainer.train()
    history = [cb.server.history[r] for r in sorted(cb.server.history)]
    assert len(history) == 6
    replica = tiny_bert()  # the initial weights: same seed as the trained model's start
    opt = fresh_optimizer(tmp_path, replica, args)
    replay(opt, history)
    for a, b in zip(opt.params, trainer.zo_optimizer.params, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)
    for a, b in zip(opt.hessian(), trainer.zo_optimizer.hessian(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)

    # A client synchronised at round 2 that missed rounds 2..5 catches up from the history alone.
    late = tiny_bert()
    late_opt = fresh_optimizer(tmp_path, late, args)
    replay(late_opt, history[:2])
    replay(late_opt, history[2:])
    for a, b in zip(late_opt.params, trainer.zo_optimizer.params, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)


def test_server_keeps_history_while_needed():
    server = FederatedServer(5, 1, seed=0)
    seen = set()
    for _ in range(30):
        plan = server.plan_round()
        seen.update(plan.clients)
        for c in plan.clients:
            assert [h.round_idx for h in server.catch_up_payload(c)] == server.missed_rounds(c)
        server.commit_round(plan, torch.zeros(1, 5), [0.1])
        assert min(server.history, default=server.round_idx) <= min(server.last_sync)
    assert len(server.history) <= server.round_idx - min(server.last_sync)


@pytest.mark.parametrize("clients, sampled, tau, P", [(3, 2, 1, 5), (5, 3, 2, 2), (4, 4, 3, 1)])
def test_ledger_matches_specification(tmp_path, clients, sampled, tau, P):
    rounds = 3
    args = hiso_args(tmp_path, max_steps=rounds, zo_num_directions=P, per_device_train_batch_size=4)
    trainer, cb = federated_trainer(
        tmp_path, args=args, num_clients=clients, clients_per_round=sampled, local_steps=tau
    )
    trainer.train()
    led = cb.ledger
    assert_ledger_formula(trainer, led, args.seed, clients, sampled, tau, P, rounds)
    logged = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert logged["fed/bytes_uplink_total"] == led.bytes_uplink_total
    assert logged["fed/fedavg_bytes_total"] == led.fedavg_bytes_total
    summary = cb.federation_summary()
    assert summary["num_clients"] == clients and summary["rounds"] == rounds


def test_dropped_clients_are_left_out_and_catch_up(tmp_path):
    args = hiso_args(tmp_path, max_steps=12)
    trainer, cb = federated_trainer(tmp_path, args=args, num_clients=4, clients_per_round=3, drop_rate=0.4)
    trainer.train()
    assert cb.dropped_reports > 0
    assert cb.ledger.clients_reported + cb.dropped_reports == cb.ledger.clients_sampled
    assert all(torch.isfinite(p).all() for p in trainer.zo_optimizer.params)
    assert cb.server.round_idx == 12


def test_nonfinite_reports_never_reach_the_model(tmp_path, monkeypatch):
    trainer, cb = federated_trainer(
        tmp_path, args=hiso_args(tmp_path, max_steps=6), num_clients=3, clients_per_round=3, history_retention="all"
    )
    original = FederatedZOCallback.client_report

    def faulty(self, trainer, model, client, plan):
        scalars, loss = original(self, trainer, model, client, plan)
        if client == 0:
            scalars[0, 0] = float("nan")
        return scalars, loss

    monkeypatch.setattr(FederatedZOCallback, "client_report", faulty)
    trainer.train()
    assert cb.rejected_reports == 6
    for record in cb.server.history.values():
        assert torch.isfinite(record.scalars).all()
    assert all(torch.isfinite(p).all() for p in trainer.zo_optimizer.params)
    assert [h for h in trainer.state.log_history if "loss" in h][-1]["fed/rejected_reports"] == 6


def test_resume_mid_run_equals_uninterrupted(tmp_path):
    fed = {"num_clients": 4, "clients_per_round": 2, "local_steps": 2, "partition": "dirichlet"}
    full, full_cb = federated_trainer(tmp_path, args=hiso_args(tmp_path / "full", max_steps=6), **fed)
    full.train()
    args = hiso_args(tmp_path / "cut", max_steps=6, save_strategy="steps", save_steps=3)
    first, _ = federated_trainer(tmp_path, args=args, **fed)
    first.train()
    ckpt = tmp_path / "cut" / "out" / "checkpoint-3"
    assert (ckpt / FEDERATED_STATE_NAME).exists()
    resumed, resumed_cb = federated_trainer(tmp_path, model=tiny_bert(seed=9), args=args, **fed)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for a, b in zip(full.zo_optimizer.params, resumed.zo_optimizer.params, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)
    assert resumed_cb.ledger.summary() == full_cb.ledger.summary()
    assert resumed_cb.server.last_sync == full_cb.server.last_sync
    assert resumed.zo_forward_passes == full.zo_forward_passes > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_clients": 2, "clients_per_round": 3}, "clients_per_round"),
        ({"num_clients": 0}, "num_clients"),
        ({"dirichlet_alpha": 0.0}, "dirichlet_alpha"),
        ({"partition": "by_magic"}, "partition"),
        ({"aggregation": "max"}, "aggregation"),
        ({"drop_rate": 1.0}, "drop_rate"),
        ({"local_steps": 0}, "local_steps"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FederatedZOCallback(**kwargs)


def test_missing_label_column_for_dirichlet(tmp_path):
    data = toy_dataset(16).remove_columns("labels")
    trainer, _ = federated_trainer(tmp_path, data=data, partition="dirichlet")
    with pytest.raises(ValueError, match="label"):
        trainer.train()


def test_gradient_accumulation_refused(tmp_path):
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        federated_trainer(tmp_path, args=hiso_args(tmp_path, gradient_accumulation_steps=2))


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_robust_aggregation_resists_an_outlier(method):
    from hf_hiso.federated.protocol import aggregate

    reports = {c: torch.full((1, 2), 1.0 + 0.01 * c) for c in range(5)}
    reports[4] = torch.full((1, 2), 1e6)
    out = aggregate(reports, method, trim_ratio=0.2).scalars
    assert out.max() < 1.1
    assert aggregate(reports, "mean").scalars.max() > 1e5
