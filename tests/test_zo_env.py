"""`HISO_ZO_*` environment variables: the zeroth-order settings of a script that only knows `TrainingArguments`."""

import logging
import os

import pytest
from conftest import hiso_args, tiny_bert, toy_dataset
from transformers import TrainingArguments
from transformers.trainer import logger as trainer_logger

from hf_hiso import HiSoConfig, HiSoTrainer, ZOArguments
from hf_hiso.hiso_trainer import check_process_group
from hf_hiso.zo_env import env_name, resolve_zo_arguments


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in [k for k in os.environ if k.startswith("HISO_")]:
        monkeypatch.delenv(name)


def plain_args(tmp_path, **overrides) -> TrainingArguments:
    settings = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "report_to": "none",
        "use_cpu": True,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "disable_tqdm": True,
        "logging_steps": 1,
        "save_strategy": "no",
    }
    return TrainingArguments(**{**settings, **overrides})


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_environment_sets_what_plain_training_arguments_lack(tmp_path, monkeypatch):
    monkeypatch.setenv("HISO_ZO_NUM_DIRECTIONS", "2")
    monkeypatch.setenv("HISO_ZO_DIFFERENCE", "central")
    monkeypatch.setenv("HISO_ZO_PRECONDITIONER", "false")
    trainer = HiSoTrainer(model=tiny_bert(), args=plain_args(tmp_path), train_dataset=toy_dataset(16))
    handler, saved_level = Lines(), trainer_logger.level
    trainer_logger.addHandler(handler)
    trainer_logger.setLevel(logging.INFO)
    try:
        trainer.train()
    finally:
        trainer_logger.removeHandler(handler)
        trainer_logger.setLevel(saved_level)
    opt = trainer.zo_optimizer
    # The optimizer does what the environment asked: 2 directions, central differences (2P + 1 = 5 loss evaluations
    # per step), H kept at identity.
    assert opt.num_directions == 2 and opt.difference == "central" and not opt.preconditioner
    assert opt.last_forward_passes == 5 and trainer.zo_forward_passes == 10
    assert all(float(h.min()) == float(h.max()) == 1.0 for h in opt.hessian() or [])
    # One line at the start of training names every setting and its source.
    lines = [line for line in handler.lines if line.startswith("Zeroth-order settings:")]
    assert len(lines) == 1
    assert "zo_num_directions=2 (env)" in lines[0] and "zo_difference='central' (env)" in lines[0]
    assert "zo_preconditioner=False (env)" in lines[0] and "zo_eps=0.001 (default)" in lines[0]


def test_config_field_beats_environment_beats_default(tmp_path, monkeypatch):
    monkeypatch.setenv("HISO_ZO_NUM_DIRECTIONS", "3")
    monkeypatch.setenv("HISO_ZO_EPS", "0.01")
    config = HiSoConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, zo_num_directions=7)
    settings, sources = resolve_zo_arguments(ZOArguments, config)
    # A HiSoConfig has every field: its values win over the environment (whose ignored values are warned about).
    assert (settings.zo_num_directions, sources["zo_num_directions"]) == (7, "config")
    assert (settings.zo_eps, sources["zo_eps"]) == (1e-3, "config")
    settings, sources = resolve_zo_arguments(ZOArguments, plain_args(tmp_path))
    assert (settings.zo_num_directions, sources["zo_num_directions"]) == (3, "env")
    assert (settings.zo_eps, sources["zo_eps"]) == (0.01, "env")
    assert (settings.zo_difference, sources["zo_difference"]) == ("forward", "default")
    monkeypatch.delenv("HISO_ZO_NUM_DIRECTIONS")
    assert resolve_zo_arguments(ZOArguments, plain_args(tmp_path))[0].zo_num_directions == 5


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("HISO_ZO_NUM_DIRECTIONS", "two", "HISO_ZO_NUM_DIRECTIONS` must be an integer"),
        ("HISO_ZO_NUM_DIRECTIONS", "0", "zo_num_directions.*HISO_ZO_NUM_DIRECTIONS='0'"),
        ("HISO_ZO_EPS", "-1e-3", "zo_eps.*HISO_ZO_EPS='-1e-3'"),
        ("HISO_ZO_PRECONDITIONER", "maybe", "HISO_ZO_PRECONDITIONER` must be one of"),
        ("HISO_ZO_DIFFERENCE", "backward", "HISO_ZO_DIFFERENCE` must be one of \\['forward', 'central'\\]"),
        ("HISO_ZO_CURVATURE_FORGET", "2", "zo_curvature_forget.*HISO_ZO_CURVATURE_FORGET='2'"),
        ("HISO_ZO_NUM_DIRECTION", "1", "Unknown zeroth-order setting.*HISO_ZO_NUM_DIRECTION'"),
    ],
)
def test_bad_environment_value_names_the_variable(tmp_path, monkeypatch, name, value, match):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        HiSoTrainer(model=tiny_bert(), args=plain_args(tmp_path), train_dataset=toy_dataset(8))


def test_every_setting_has_a_variable(monkeypatch, tmp_path):
    """Each `zo_*` field is reachable from the environment (a new field cannot be forgotten)."""
    from dataclasses import fields

    for f in fields(ZOArguments):
        value = getattr(ZOArguments(), f.name)
        monkeypatch.setenv(env_name(f.name), "{}" if value is None else str(value))  # None: an empty JSON dict
    _, sources = resolve_zo_arguments(ZOArguments, plain_args(tmp_path))
    assert set(sources.values()) == {"env"}


def test_launched_processes_that_did_not_join_are_refused(tmp_path, monkeypatch):
    """`accelerate launch --multi_gpu --num_processes 2` without GPUs and without `use_cpu`: each process would train
    alone into the same output_dir; refused before training, whatever the callbacks."""
    args = plain_args(tmp_path, use_cpu=False)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what the launcher sets; this process is a group of one
    assert args.world_size == 1
    with pytest.raises(ValueError, match="WORLD_SIZE.*use_cpu"):
        HiSoTrainer(model=tiny_bert(), args=args, train_dataset=toy_dataset(8))
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_process_group(args)


def test_scalar_metrics_do_not_depend_on_how_the_batch_is_split(tmp_path):
    """`zo/scalar_*` describe the scalars of the update (the whole batch's), so two micro-batches of 4 log what one
    batch of 8 logs; the same holds for processes, whose scalars are averaged (tests/test_distributed.py)."""
    logs = []
    for batch, accumulation in ((8, 1), (4, 2)):
        args = hiso_args(
            tmp_path / str(batch), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation
        )
        trainer = HiSoTrainer(model=tiny_bert(), args=args, train_dataset=toy_dataset(8))
        trainer.train()
        logs.append([h for h in trainer.state.log_history if "loss" in h])
    for whole, split in zip(*logs, strict=True):
        for key in ("zo/scalar_abs_mean", "zo/scalar_rms"):
            assert split[key] == pytest.approx(whole[key], rel=1e-3), key  # loss rounding / zo_eps: 2e-4
