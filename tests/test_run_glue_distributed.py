"""examples/run_glue.py under two processes against the same arguments in one process.

The script runs unchanged under `accelerate launch --multi_gpu --num_processes 2` (two gloo CPU processes: `HiSoConfig`
sets `use_cpu=True` when several processes run without an accelerator), with its default federated simulation: the
sampled clients of a round are shared out among the processes, so the trained adapter, the metrics, the logged loss
and the bytes in the ledger must be those of one process. The tiny model, tokenizer and csv data are built as in
`tests/test_run_glue.py`; the one-process reference runs in the pytest process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_run_glue import load_run_glue, make_text_rows, make_tiny_text_model, tiny_argv, write_csv

ROOT = Path(__file__).resolve().parent.parent
# 3 clients, all sampled, 2 local steps: rank 0 runs two clients a round and rank 1 one, and every client's batch
# position must advance on both ranks.
EXTRA = ("--max_steps", "6", "--clients_per_round", "3", "--local_steps", "2", "--logging_steps", "1")


def free_port() -> int:
    """A port nobody listens on, so that concurrent launches on the machine do not collide on accelerate's 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "examples" / "run_glue.py"), *argv,
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def test_launched_processes_that_do_not_join_are_refused(tmp_path, monkeypatch):
    """`accelerate launch --multi_gpu` on a machine without GPUs: `HiSoConfig` sets `use_cpu=True` itself so that the
    processes form one gloo group; a plain `TrainingArguments` without `use_cpu` would run each process as a job of
    its own (the whole federation twice into one output_dir), which the federated callback refuses."""
    from conftest import tiny_bert, toy_dataset
    from transformers import TrainingArguments

    from hf_hiso import FederatedZOCallback, HiSoConfig, HiSoTrainer

    monkeypatch.setenv("WORLD_SIZE", "2")  # what the launcher sets; no LOCAL_RANK, so no process group is formed
    with monkeypatch.context() as m:
        # Only the flag is checked: TrainingArguments' own post-init would set up the group and wait for rank 1.
        m.setattr(TrainingArguments, "__post_init__", lambda self: None)
        assert HiSoConfig(output_dir=str(tmp_path), report_to="none").use_cpu is True
        assert HiSoConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True).use_cpu is True
    plain = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=False)
    assert plain.world_size == 1
    with pytest.raises(ValueError, match="use_cpu"):
        HiSoTrainer(model=tiny_bert(), args=plain, train_dataset=toy_dataset(8), callbacks=[FederatedZOCallback()])


# Two start-ups of the script (torch, transformers, peft, datasets imports) take 20 to 60 s on 2 shared cores.
@pytest.mark.slow
def test_run_glue_two_processes_equals_one_process(tmp_path):
    setup = {
        "model": make_tiny_text_model(tmp_path / "tiny-bert"),
        "train": write_csv(tmp_path / "train.csv", make_text_rows(64, seed=0)),
        # Two full evaluation batches of 32: with a last short batch, accelerate would complete it with repeated
        # examples under two processes (`even_batches`), which changes that batch's mean loss, hence `eval_loss`.
        "validation": write_csv(tmp_path / "dev.csv", make_text_rows(64, seed=1)),
    }
    two, one = tmp_path / "two", tmp_path / "one"
    argv = tiny_argv(setup, two, *EXTRA)
    i = argv.index("--use_cpu")
    # Launched as a user would, without `--use_cpu`: HiSoConfig must make the two CPU processes one group.
    done = launch_two_processes(argv[:i] + argv[i + 2 :])
    load_run_glue().run(tiny_argv(setup, one, *EXTRA))

    # Only process 0 reports and writes.
    assert done.stdout.count("run_glue summary") == 1

    results2, results1 = (json.loads((d / "all_results.json").read_text()) for d in (two, one))
    for key in ("eval_accuracy", "eval_f1", "eval_loss"):
        assert results2[key] == pytest.approx(results1[key], rel=1e-6, abs=1e-7), key
    for key in ("rounds", "bytes_uplink", "bytes_downlink", "bytes_total", "fedavg_bytes", "paper_bytes"):
        assert results2[key] == results1[key], key
    assert results1["rounds"] == 6 and results1["bytes_total"] > 0
    before2, before1 = (json.loads((d / "eval_before_results.json").read_text()) for d in (two, one))
    assert before2["eval_loss"] == pytest.approx(before1["eval_loss"], rel=1e-6)

    # The card's inputs: same federation (bytes, clients, faults) and metrics; it knows it ran on two processes.
    card2, card1 = (json.loads((d / "hiso_card.json").read_text()) for d in (two, one))
    assert card2["federation"] == card1["federation"]
    assert card2["training"]["num_processes"] == 2 and card1["training"]["num_processes"] == 1
    assert card2["training"]["global_step"] == card1["training"]["global_step"] == 6
    for key, value in card1["metrics"].items():
        assert card2["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key

    # The same adapter and head, to float tolerance (in practice bit for bit), and training moved them.
    adapter2, adapter1 = (load_file(d / "adapter_model.safetensors") for d in (two, one))
    assert sorted(adapter2) == sorted(adapter1)
    for name, tensor in adapter1.items():
        torch.testing.assert_close(adapter2[name], tensor, rtol=0, atol=1e-6, msg=name)

    # The logged training loss: one entry per round, the same values (not scaled by the process count), and the
    # same epoch: the Trainer's batches only pace the rounds and are not sharded.
    logs2, logs1 = (
        [h for h in json.loads((d / "trainer_state.json").read_text())["log_history"] if "loss" in h]
        for d in (two, one)
    )
    assert len(logs2) == len(logs1) == 6
    for h2, h1 in zip(logs2, logs1, strict=True):
        for key in ("loss", "epoch", "zo/forward_passes", "zo/scalar_abs_mean", "fed/bytes_total"):
            assert h2[key] == pytest.approx(h1[key], rel=1e-9), key
