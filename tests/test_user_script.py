"""A user's script, written the way the transformers examples are, with only `Trainer` swapped for `HiSoTrainer`
(`tests/user_script_text_classification.py`), run in a subprocess on a tiny model and small csv files. The
zeroth-order settings come from `HISO_ZO_*` environment variables (its parser knows no `--zo_*` option): the test
reads them back from the settings line the run logs and from what the optimizer did."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_run_glue import make_text_rows, make_tiny_text_model, write_csv

# Two start-ups of a script (torch, transformers, datasets, scikit-learn imports): 20 to 60 s on 2 shared cores.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "user_script_text_classification.py"
P = 2  # HISO_ZO_NUM_DIRECTIONS; central differences: 2P + 1 = 5 loss evaluations per step (the default costs 6)
STEPS = 6


def run_script(
    setup: dict[str, Path], out: Path, *extra: str, launcher: tuple[str, ...] = (), use_cpu: bool = True, check=True
) -> subprocess.CompletedProcess:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HISO_")},
        "HISO_ZO_NUM_DIRECTIONS": str(P),
        "HISO_ZO_DIFFERENCE": "central",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    argv = [
        "--model_name_or_path", str(setup["model"]),
        "--train_file", str(setup["train"]),
        "--validation_file", str(setup["validation"]),
        "--test_file", str(setup["test"]),
        "--output_dir", str(out),
        "--do_train", "--do_eval", "--do_predict",
        "--max_steps", str(STEPS),
        "--per_device_train_batch_size", "8",
        "--learning_rate", "0.05",
        "--lr_scheduler_type", "linear",
        "--logging_steps", "1",
        "--save_steps", "3",
        "--report_to", "none",
        *(["--use_cpu"] if use_cpu else []),
        "--disable_tqdm", "true",
        "--seed", "0",
        *extra,
    ]  # fmt: skip
    command = [sys.executable, *(launcher or [str(SCRIPT)]), *argv]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 or not check, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def two_processes() -> tuple[str, ...]:
    """`accelerate launch --multi_gpu --num_processes 2` on this machine without GPUs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return (
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
    )  # fmt: skip


def settings_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "Zeroth-order settings:" in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("user_script")
    setup = make_setup(root)
    full = run_script(setup, root / "full")
    # A second run resumes the first one's mid-run checkpoint into a new folder and trains to the same end.
    resumed = run_script(setup, root / "resumed", "--resume_from_checkpoint", str(root / "full" / "checkpoint-3"))
    return {"root": root, "setup": setup, "full": full, "resumed": resumed}


def make_setup(root: Path) -> dict[str, Path]:
    return {
        "model": make_tiny_text_model(root / "tiny-bert"),
        "train": write_csv(root / "train.csv", make_text_rows(48, seed=0)),
        "validation": write_csv(root / "dev.csv", make_text_rows(24, seed=1)),
        "test": write_csv(root / "test.csv", make_text_rows(16, seed=2)),
    }


def test_environment_settings_take_effect(runs):
    line = settings_line(runs["full"])
    assert f"zo_num_directions={P} (env)" in line and "zo_difference='central' (env)" in line
    assert "zo_eps=0.001 (default)" in line and "zo_preconditioner=True (default)" in line
    # The optimizer did what the line says: 2P + 1 loss evaluations per step, P scalars in its state.
    logs = json.loads((runs["root"] / "full" / "trainer_state.json").read_text())["log_history"]
    passes = [h["zo/forward_passes"] for h in logs if "loss" in h]
    assert passes == [(2 * P + 1) * (step + 1) for step in range(STEPS)]
    card = json.loads((runs["root"] / "full" / "hiso_card.json").read_text())
    assert card["zo"]["zo_num_directions"] == P and card["zo"]["zo_difference"] == "central"


def test_train_eval_predict_and_resume(runs):
    root = runs["root"]
    results = json.loads((root / "full" / "all_results.json").read_text())
    assert {"eval_accuracy", "eval_f1", "train_loss"} <= results.keys()
    predictions = (root / "full" / "predict_results.txt").read_text().splitlines()
    assert len(predictions) == 1 + 16 and re.fullmatch(r"\d+\t[01]", predictions[1])
    assert (root / "full" / "checkpoint-3").is_dir() and (root / "full" / "checkpoint-6").is_dir()
    # Resuming from step 3 in a new process ends at the uninterrupted run's model, bit for bit, with the same logs.
    full = load_file(root / "full" / "model.safetensors")
    resumed = load_file(root / "resumed" / "model.safetensors")
    initial = load_file(root / "tiny-bert" / "model.safetensors")
    assert full.keys() == resumed.keys()
    assert any(not torch.equal(full[k], initial[k]) for k in full)
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    logs = {
        name: [h for h in json.loads((root / name / "trainer_state.json").read_text())["log_history"] if "loss" in h]
        for name in ("full", "resumed")
    }
    assert logs["resumed"] == logs["full"]  # the history up to the checkpoint, then the same steps
    settings = [settings_line(runs[name]).split("Zeroth-order settings:")[1] for name in ("full", "resumed")]
    assert settings[0] == settings[1]


def test_two_processes_train_as_one_job_or_are_refused(runs):
    """Without `--use_cpu` the two launched processes would each train alone into one output_dir: both stop before
    training with an error saying so. With it they form one gloo group: one settings line (rank 0), the data split
    between them, and every step's scalars averaged, so the run ends where one process on the whole batch ends (up to
    the float rounding of the scalars)."""
    root, setup = runs["root"], runs["setup"]
    refused = run_script(setup, root / "refused", launcher=two_processes(), use_cpu=False, check=False)
    assert refused.returncode != 0
    assert refused.stderr.count("The launcher started 2 processes (WORLD_SIZE)") == 2
    assert not (root / "refused" / "checkpoint-3").exists() and not (root / "refused" / "model.safetensors").exists()

    joined = run_script(setup, root / "joined", "--per_device_train_batch_size", "4", launcher=two_processes())
    settings_line(joined)  # exactly one: rank 0's
    logs = json.loads((root / "joined" / "trainer_state.json").read_text())["log_history"]
    single = json.loads((root / "full" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in logs if "loss" in h] == list(range(1, STEPS + 1))
    for h, ref in zip([h for h in logs if "loss" in h], [h for h in single if "loss" in h], strict=True):
        assert h["zo/forward_passes"] == ref["zo/forward_passes"]
        for key in ("loss", "zo/scalar_abs_mean", "zo/scalar_rms"):
            assert h[key] == pytest.approx(ref[key], rel=1e-2), key
