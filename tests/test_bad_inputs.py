"""Bad input is refused before training with an error naming the field, and a rejected step changes nothing."""

import logging
import math

import pytest
import torch
from conftest import hiso_args, tiny_bert, toy_dataset
from transformers import TrainingArguments

from hf_hiso import FederatedZOCallback, HiSoConfig, HiSoOptimizer, HiSoTrainer
from hf_hiso.zo_optimizer import MAX_CONSECUTIVE_SKIPS, NonFiniteScalarError

NAN, INF = float("nan"), float("inf")

CONFIG_CASES = [
    ({"learning_rate": NAN}, "learning_rate"),
    ({"learning_rate": INF}, "learning_rate"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"learning_rate": "0.1"}, "learning_rate"),
    ({"weight_decay": NAN}, "weight_decay"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"zo_eps": 1e300}, "zo_eps"),
    ({"zo_eps": 1e-30}, "zo_eps"),
    ({"zo_eps": True}, "zo_eps"),
    ({"zo_eps": NAN}, "zo_eps"),
    ({"zo_eps": 0.0}, "zo_eps"),
    ({"zo_num_directions": 10**12}, "zo_num_directions"),
    ({"zo_num_directions": 0}, "zo_num_directions"),
    ({"zo_num_directions": True}, "zo_num_directions"),
    ({"zo_num_directions": 2.5}, "zo_num_directions"),
    ({"zo_preconditioner": "false"}, "zo_preconditioner"),
    ({"zo_skip_nonfinite": "yes"}, "zo_skip_nonfinite"),
    ({"zo_curvature": 1}, "zo_curvature"),
    ({"zo_difference": "backward"}, "zo_difference"),
    ({"zo_hessian_smooth": 1.0}, "zo_hessian_smooth"),
    ({"zo_hessian_damping": -1e-8}, "zo_hessian_damping"),
    ({"zo_hessian_update": "first"}, "zo_hessian_update"),
    ({"zo_generator": "gpu"}, "zo_generator"),
    ({"zo_cache_directions": "maybe"}, "zo_cache_directions"),
]


@pytest.mark.parametrize("kwargs, field", CONFIG_CASES)
def test_hiso_config_refuses(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        HiSoConfig(output_dir=str(tmp_path), **kwargs)


@pytest.mark.parametrize("kwargs, field", CONFIG_CASES[:6])
def test_plain_training_arguments_refused_at_trainer_construction(tmp_path, kwargs, field):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kwargs)
    with pytest.raises(ValueError, match=f"`{field}`"):
        HiSoTrainer(model=tiny_bert(), args=args, train_dataset=toy_dataset(8))


OPTIMIZER_CASES = [
    ({"lr": NAN}, "lr"),
    ({"lr": -1e-3}, "lr"),
    ({"lr": "0.1"}, "lr"),
    ({"weight_decay": INF}, "weight_decay"),
    ({"zo_eps": -1.0}, "zo_eps"),
    ({"num_directions": 10**12}, "num_directions"),
]


@pytest.mark.parametrize("kwargs, field", OPTIMIZER_CASES)
def test_optimizer_refuses(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        HiSoOptimizer([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_no_trainable_parameters_is_a_clear_error(tmp_path):
    model = tiny_bert()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        HiSoTrainer(model=model, args=hiso_args(tmp_path, max_steps=1), train_dataset=toy_dataset(8)).train()


CALLBACK_CASES = [
    ({"drop_rate": "0.5"}, "drop_rate"),
    ({"drop_rate": True}, "drop_rate"),
    ({"drop_rate": NAN}, "drop_rate"),
    ({"num_clients": 2, "clients_per_round": 3}, "clients_per_round"),
    ({"local_steps": 0}, "local_steps"),
    ({"aggregation": "max"}, "aggregation"),
]


@pytest.mark.parametrize("kwargs, field", CALLBACK_CASES)
def test_callback_refuses(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        FederatedZOCallback(**kwargs)


def test_hub_token_never_in_a_representation(tmp_path):
    args = HiSoConfig(output_dir=str(tmp_path), hub_token="hf_DoNotLeakMe123")
    for text in (repr(args), str(args), args.to_json_string(), repr(args.to_dict())):
        assert "DoNotLeakMe" not in text
    assert "zo_eps=" in repr(args)


def _model_state(trainer):
    opt = trainer.zo_optimizer
    params = [p.detach().clone() for p in opt.params]
    hessian = [h.clone() for h in opt.hessian()]
    return params, hessian


@pytest.mark.parametrize("lr", [NAN, INF])
def test_non_finite_learning_rate_changes_nothing(tmp_path, lr):
    trainer = HiSoTrainer(model=tiny_bert(), args=hiso_args(tmp_path, max_steps=2), train_dataset=toy_dataset(16))
    trainer.create_optimizer()
    before = _model_state(trainer)
    trainer.zo_optimizer.param_groups[0]["lr"] = lr
    opt = trainer.zo_optimizer
    with pytest.raises(ValueError, match="`lr`"):
        opt.step(lambda: torch.tensor(1.0) + sum(p.sum() for p in opt.params) * 0)
    after = _model_state(trainer)
    for a, b in zip(before[0] + before[1], after[0] + after[1], strict=True):
        assert torch.equal(a, b)


def test_every_step_skipped_stops_the_run(caplog):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = HiSoOptimizer([p], lr=0.1, skip_nonfinite=True)
    with caplog.at_level(logging.WARNING, logger="hf_hiso.zo_optimizer"):
        for _ in range(MAX_CONSECUTIVE_SKIPS - 1):
            opt.step(lambda: torch.tensor(math.nan))
        with pytest.raises(NonFiniteScalarError, match=f"last {MAX_CONSECUTIVE_SKIPS} steps"):
            opt.step(lambda: torch.tensor(math.nan))
    # Only the measurement's perturb-and-restore rounding remains (no update was applied).
    torch.testing.assert_close(p.detach(), torch.zeros(3), rtol=0, atol=1e-8)
    assert "skipped" in caplog.text
    # A finite step in between resets the count.
    opt = HiSoOptimizer([p], lr=0.1, skip_nonfinite=True)
    for i in range(2 * MAX_CONSECUTIVE_SKIPS):
        opt.step(lambda i=i: torch.tensor(math.nan) if i % 5 else (p**2).sum())
