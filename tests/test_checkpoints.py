"""Checkpoints are complete or absent, never run code, and a resume never loses rounds silently.

A kill is simulated by raising `Killed` (a `BaseException`, like the KeyboardInterrupt of a stopped job) from the
function that writes one phase of a checkpoint; the run then resumes with `resume_from_checkpoint=True` in a new
trainer built from a different random model, and must end equal to the uninterrupted run (or stop with an error that
names the file).
"""

import importlib
import os
import shutil

import pytest
import torch
from conftest import hiso_args, tiny_bert, toy_dataset

import hf_hiso.hiso_trainer as hiso_trainer_module
from hf_hiso import FederatedZOCallback, HiSoTrainer
from hf_hiso.checkpointing import (
    FEDERATED_STATE_NAME,
    MANIFEST_NAME,
    CheckpointError,
    atomic_torch_save,
    checkpoint_problem,
    newest_complete_checkpoint,
)

STEPS, SAVE_EVERY = 6, 2
FED = {"num_clients": 3, "clients_per_round": 2, "local_steps": 2, "partition": "iid", "drop_rate": 0.2}


class Killed(BaseException):
    pass


def make_trainer(out, federated, model_seed=0, **overrides):
    args = hiso_args(out, max_steps=STEPS, save_strategy="steps", save_steps=SAVE_EVERY, **overrides)
    callbacks = [FederatedZOCallback(**FED)] if federated else []
    return HiSoTrainer(model=tiny_bert(seed=model_seed), args=args, train_dataset=toy_dataset(32), callbacks=callbacks)


def trained_params(trainer):
    return [p.detach().clone() for p in trainer.zo_optimizer.params]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = {}
    for federated in (False, True):
        trainer = make_trainer(tmp_path_factory.mktemp("full"), federated)
        trainer.train()
        out[federated] = trained_params(trainer)
    return out


def run_until_killed(out, federated, target, when, monkeypatch, **overrides):
    """Trains and raises `Killed` at the first call of `target` (module, function name) whose arguments mention
    `when` (a file of the second checkpoint), or at its `when`-th call if `when` is an int."""
    module, name = target
    original = getattr(module, name)
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        hit = calls["n"] == when if isinstance(when, int) else when in " ".join(map(str, (*args, *kwargs.values())))
        if hit:
            raise Killed(name)
        return original(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(module, name, dying)
        with pytest.raises(Killed):
            make_trainer(out, federated, **overrides).train()


def resume_and_compare(out, federated, expected, **overrides):
    trainer = make_trainer(out, federated, model_seed=7, **overrides)
    trainer.train(resume_from_checkpoint=True)
    for a, b in zip(trained_params(trainer), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


SECOND = f"checkpoint-{2 * SAVE_EVERY}"
PHASES = {
    # the model, optimizer and scheduler files of the second checkpoint (`torch.save` writes the latter two)
    "model": ("transformers.trainer.Trainer", "save_model", SECOND),
    "optimizer": (torch, "save", f"{SECOND}/optimizer.pt"),
    "scheduler": (torch, "save", f"{SECOND}/scheduler.pt"),
    # HiSo's files (federated state, manifest) of the second checkpoint
    "hiso_files": (hiso_trainer_module, "write_manifest", SECOND),
    # trainer_state.json, the Trainer's last file
    "trainer_state": ("transformers.trainer_callback.TrainerState", "save_to_json", SECOND),
    # the rotation of old checkpoints, after the second one is complete
    "rotation": ("transformers.trainer", "rotate_checkpoints", 2),
}


def _target(spec):
    module, name, when = spec
    if isinstance(module, str):
        mod_name, _, attr = module.rpartition(".")
        try:
            module = importlib.import_module(module)
        except ImportError:
            module = getattr(importlib.import_module(mod_name), attr)
    return (module, name), when


# The whole matrix is slow (24 runs); the default suite keeps the federated run with `save_total_limit=1`, where a
# write after the rotation would lose every round.
KILLS = [
    pytest.param(phase, limit, federated, marks=() if (federated and limit == 1) else pytest.mark.slow)
    for phase in PHASES
    for limit in (None, 1)
    for federated in (False, True)
]


@pytest.mark.parametrize("phase, limit, federated", KILLS)
def test_kill_during_checkpoint_then_resume_equals_uninterrupted(
    tmp_path, monkeypatch, uninterrupted, phase, limit, federated
):
    target, at = _target(PHASES[phase])
    overrides = {} if limit is None else {"save_total_limit": limit}
    run_until_killed(tmp_path, federated, target, at, monkeypatch, **overrides)
    resume_and_compare(tmp_path, federated, uninterrupted[federated], **overrides)


def _checkpoints(out):
    root = os.path.join(out, "out")
    return sorted((os.path.join(root, n) for n in os.listdir(root) if n.startswith("checkpoint-")), key=len)


def _damage(path, how):
    if how == "deleted":
        os.remove(path)
    elif how == "zero":
        open(path, "wb").close()
    elif how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "flipped":
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x55]))


DAMAGES = [
    (name, how)
    for name in ("optimizer.pt", "scheduler.pt", FEDERATED_STATE_NAME, "trainer_state.json", "model.safetensors")
    for how in ("deleted", "zero", "truncated", "flipped")
    # JSON carries no checksum and is written after the manifest: a flipped byte that still parses goes unseen.
    if (name, how) != ("trainer_state.json", "flipped")
]
DAMAGES = [
    pytest.param(*d, marks=() if d[1] in ("flipped", "deleted") and d[0] != "scheduler.pt" else pytest.mark.slow)
    for d in DAMAGES
]


@pytest.mark.parametrize("name, how", DAMAGES)
def test_damaged_newest_checkpoint_is_skipped_or_named(tmp_path, uninterrupted, name, how):
    trainer = make_trainer(tmp_path, True)
    trainer.train()
    newest = os.path.join(tmp_path, "out", f"checkpoint-{STEPS}")
    # Keep the run resumable from the middle: drop the last checkpoint's successor steps by damaging it.
    _damage(os.path.join(newest, name), how)
    problem = checkpoint_problem(newest, (FEDERATED_STATE_NAME,))
    assert problem is not None and name in problem
    # An explicit resume from the damaged folder is a clear error naming the file, before any training.
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        make_trainer(tmp_path, True, model_seed=7).train(resume_from_checkpoint=newest)
    # `True` skips it and takes the newest complete one.
    folder, skipped = newest_complete_checkpoint(os.path.join(tmp_path, "out"), (FEDERATED_STATE_NAME,))
    assert folder.endswith(f"checkpoint-{STEPS - SAVE_EVERY}") and skipped[0][0] == newest
    resume_and_compare(tmp_path, True, uninterrupted[True])


def test_missing_optimizer_is_refused_not_silently_restarted(tmp_path):
    make_trainer(tmp_path, False).train()
    for folder in _checkpoints(tmp_path):
        os.remove(os.path.join(folder, "optimizer.pt"))
    with pytest.raises(ValueError, match=r"optimizer\.pt is missing"):
        make_trainer(tmp_path, False).train(resume_from_checkpoint=True)


def test_planted_pickle_is_refused_without_running(tmp_path):
    make_trainer(tmp_path, True).train()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    newest = os.path.join(tmp_path, "out", f"checkpoint-{STEPS}")
    torch.save({"server": Payload()}, os.path.join(newest, FEDERATED_STATE_NAME))
    os.remove(os.path.join(newest, MANIFEST_NAME))  # an attacker rewrites the manifest too: no help from hashes
    with pytest.raises(CheckpointError, match="never runs code"):
        make_trainer(tmp_path, True, model_seed=7).train(resume_from_checkpoint=newest)
    assert not marker.exists()


def test_federated_checkpoint_needs_the_callback_and_the_same_federation(tmp_path):
    make_trainer(tmp_path, True).train()
    newest = os.path.join(tmp_path, "out", f"checkpoint-{STEPS}")
    with pytest.raises(ValueError, match="FederatedZOCallback"):
        make_trainer(tmp_path, False, model_seed=7).train(resume_from_checkpoint=newest)
    args = hiso_args(tmp_path, max_steps=STEPS + 2, save_strategy="steps", save_steps=SAVE_EVERY)
    other = HiSoTrainer(
        model=tiny_bert(seed=7),
        args=args,
        train_dataset=toy_dataset(32),
        callbacks=[FederatedZOCallback(**{**FED, "num_clients": 4})],
    )
    with pytest.raises(CheckpointError, match="num_clients"):
        other.train(resume_from_checkpoint=newest)


def test_full_disk_names_the_file_and_keeps_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    atomic_torch_save({"a": torch.ones(2)}, path)

    def no_space(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(OSError, match="No space left on device") as info:
        atomic_torch_save({"a": torch.zeros(2)}, path)
    assert str(path) in str(info.value)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["state.pt"]


def test_resume_true_without_checkpoints_is_clear(tmp_path):
    shutil.rmtree(tmp_path, ignore_errors=True)
    with pytest.raises(ValueError, match="No complete checkpoint"):
        make_trainer(tmp_path, False).train(resume_from_checkpoint=True)
