"""Data-parallel HiSo: two CPU processes (gloo) all-reduce only the P directional scalars per step.

The test launches this very file as a worker under `torchrun --standalone --nproc_per_node 2`; each rank trains
the variants below one after the other (one launch, so the start-up cost is paid once) and writes its final
parameters, H, logged losses and every collective call it made. The references run in the pytest process: one
process on the combined batch. The data set is exactly one global batch, so every step sees all of it whatever
order each rank's sampler draws, and "one process on the combined batch" is well defined.

Variants:
    hiso: `HiSoConfig` (average_tokens_across_devices=False), a tiny BERT classifier.
    plain: an unchanged script's `TrainingArguments` (average_tokens_across_devices=True, max_grad_norm=1.0): the
        Trainer multiplies the loss by the process count, which `HiSoTrainer` must divide out for a model that
        ignores `num_items_in_batch`.
    plain_lm: the same arguments with a tiny causal LM that normalises by `num_items_in_batch`, with a different
        number of label tokens per example, so the two ranks see different token counts: the token-weighted mean
        over processes must equal the single process's loss exactly.

Federated variants (`FederatedZOCallback`, the round's clients shared out among the ranks; the reference is one
process running every client):
    fed: 4 clients, 3 sampled per round (so the ranks get unequal work), 2 local steps, simulated faults (drop_rate)
        and a client that reports NaN now and then; `num_train_epochs=1` (the Trainer's batches pace the rounds and
        must not be sharded); a checkpoint at round 3.
    fed_resume: a fresh model resumed from that checkpoint under two processes, to the end.
    fed_tau1: one local step, no faults, 3 clients per round: rank 0 runs two clients and rank 1 one, and nothing but
        the restored round-start parameters keeps the rounding of one client's perturbations from reaching the
        next client (and the replicas from drifting apart).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Two process start-ups (torch + transformers imports) take 15 to 60 s on 2 shared cores.
pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

STEPS = 4
P = 3
GLOBAL_BATCH = 16
VARIANTS = ("hiso", "plain", "plain_lm")
FED_VARIANTS = ("fed", "fed_resume", "fed_tau1")
FED = {"num_clients": 4, "clients_per_round": 3, "local_steps": 2, "partition": "dirichlet", "drop_rate": 0.25}
FED_SETTINGS = {"fed": FED, "fed_resume": FED, "fed_tau1": {**FED, "local_steps": 1, "drop_rate": 0.0}}
FED_BATCH = 8  # per client, and the Trainer's batch: 48 examples make 6 rounds in one epoch
FED_EXAMPLES = 48
FED_SAVE = 3
COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_gather_object",
    "broadcast_object_list",
    "gather",
    "scatter",
    "_broadcast_coalesced",  # DDP's parameter and buffer synchronisation
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on 2 shared cores: several threads per forward pass make it about ten times slower under load."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _record_collectives(log: list[dict]) -> None:
    """Wraps the `torch.distributed` entry points that the Trainer, accelerate and DDP call (they look them up on the
    module at call time), recording each call's name and the number of elements it moves."""
    import torch.distributed as dist

    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def wrapped(*args, _name=name, _original=original, **kwargs):
            tensors = [a for a in args if torch.is_tensor(a)]
            tensors += [t for a in args if isinstance(a, list) for t in a if torch.is_tensor(t)]
            log.append({"op": _name, "numel": sum(t.numel() for t in tensors)})
            return _original(*args, **kwargs)

        setattr(dist, name, wrapped)


def _lm_and_data():
    from conftest import VOCAB, toy_dataset
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    data = toy_dataset(GLOBAL_BATCH).remove_columns("labels")
    # Example i predicts only its last (i % 5) + 2 tokens: unequal token counts per example, hence per rank.
    data = data.map(lambda ex, i: {"labels": [-100] * (6 - i % 5) + ex["input_ids"][6 - i % 5 :]}, with_indices=True)
    return model, data


def train(variant: str, out_dir: str, per_device_batch: int) -> dict:
    """Trains `variant` for `STEPS` steps (constant lr) and returns what the tests compare."""
    from conftest import tiny_bert, toy_dataset
    from transformers import TrainingArguments

    from hf_hiso import HiSoConfig, HiSoTrainer

    common = {
        "output_dir": os.path.join(out_dir, variant),
        "per_device_train_batch_size": per_device_batch,
        "learning_rate": 5e-2,
        "max_steps": STEPS,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
        "lr_scheduler_type": "constant",
    }
    if variant == "hiso":
        args = HiSoConfig(**common, zo_num_directions=P)
        model, data = tiny_bert(), toy_dataset(GLOBAL_BATCH)
    else:
        args = TrainingArguments(**common)
        model, data = _lm_and_data() if variant == "plain_lm" else (tiny_bert(), toy_dataset(GLOBAL_BATCH))
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls: list[dict] = []
    _record_collectives(calls)
    trainer = HiSoTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    opt = trainer.zo_optimizer
    return {
        "params": [p.detach().clone() for p in opt.params],
        "moved": max(float((p.detach() - initial[n]).abs().max()) for n, p in model.named_parameters()),
        "hessian": opt.hessian(),
        "num_processes": trainer.accelerator.num_processes,
        "wrapper": type(trainer.model_wrapped).__name__,
        "has_grad": any(p.grad is not None for p in opt.params),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "zo_logs": [
            {k: v for k, v in h.items() if k.startswith("zo/")} for h in trainer.state.log_history if "loss" in h
        ],
        "calls": calls,
        "num_states": sum(t.numel() for t in [*trainer.model.parameters(), *trainer.model.buffers()]),
    }


def faulty_callback(settings: dict):
    """`FederatedZOCallback` whose client `c` reports a NaN scalar in rounds `r` with `(r + c) % 4 == 0`, on whichever
    rank runs it: the NaN must travel through the gather and be rejected by every rank's aggregation."""
    from hf_hiso import FederatedZOCallback

    class FaultyCallback(FederatedZOCallback):
        reported: list[int] = []

        def client_report(self, trainer, model, client, plan):
            scalars, loss = super().client_report(trainer, model, client, plan)
            self.reported.append(plan.round_idx)
            if (plan.round_idx + client) % 4 == 0:
                scalars[0, 0] = float("nan")
            return scalars, loss

    callback = FaultyCallback(**settings)
    callback.reported = []
    return callback


def train_federated(variant: str, out_dir: str) -> dict:
    """`fed`: one epoch of 6 rounds, checkpoint at round 3; `fed_resume`: resumes `fed`'s checkpoint to the end."""
    from conftest import tiny_bert, toy_dataset

    from hf_hiso import HiSoConfig, HiSoTrainer
    from hf_hiso.callbacks import FEDERATED_STATE_NAME

    args = HiSoConfig(
        output_dir=os.path.join(out_dir, variant),
        per_device_train_batch_size=FED_BATCH,
        learning_rate=5e-2,
        num_train_epochs=1,
        logging_steps=1,
        save_strategy="steps",
        save_steps=FED_SAVE,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
        zo_num_directions=P,
    )
    resume = os.path.join(out_dir, "fed", f"checkpoint-{FED_SAVE}") if variant == "fed_resume" else None
    calls: list[dict] = []
    _record_collectives(calls)
    callback = faulty_callback(FED_SETTINGS[variant])
    model = tiny_bert(seed=9) if resume else tiny_bert()  # resuming must restore the weights
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = HiSoTrainer(model=model, args=args, train_dataset=toy_dataset(FED_EXAMPLES), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    opt = trainer.zo_optimizer
    checkpoint = os.path.join(args.output_dir, f"checkpoint-{FED_SAVE}", FEDERATED_STATE_NAME)
    return {
        "params": [p.detach().clone() for p in opt.params],
        "hessian": opt.hessian(),
        "moved": max(float((p.detach() - initial[n]).abs().max()) for n, p in model.named_parameters()),
        "num_processes": trainer.accelerator.num_processes,
        "global_step": trainer.state.global_step,
        "logs": [h for h in trainer.state.log_history if "loss" in h],
        "ledger": callback.ledger.summary(),
        "summary": callback.federation_summary(),
        "counters": (callback.rejected_reports, callback.dropped_reports, callback.empty_rounds),
        "positions": [c.state_dict() for c in callback.clients],
        "reported": list(callback.reported),
        "checkpoint": torch.load(checkpoint, weights_only=False) if os.path.exists(checkpoint) else None,
        "calls": calls,
    }


def worker(out_dir: str) -> None:
    import torch.distributed as dist

    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
    for variant in VARIANTS + FED_VARIANTS:
        if variant in FED_VARIANTS:
            dist.barrier()  # fed_resume reads the checkpoint that rank 0 wrote during fed
            result = train_federated(variant, out_dir)
        else:
            result = train(variant, out_dir, GLOBAL_BATCH // 2)
        for name, fn in originals.items():
            setattr(dist, name, fn)
        torch.save(result, os.path.join(out_dir, f"{variant}_rank{int(os.environ['RANK'])}.pt"))


def launch_two_processes(out: Path) -> Path:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, str(out)]
    done = subprocess.run(cmd, env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    return launch_two_processes(tmp_path_factory.mktemp("dp"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_processes_equal_one_process_on_the_combined_batch(two_processes, tmp_path, variant):
    r0 = torch.load(two_processes / f"{variant}_rank0.pt")
    r1 = torch.load(two_processes / f"{variant}_rank1.pt")
    single = train(variant, str(tmp_path), GLOBAL_BATCH)
    assert r0["num_processes"] == 2 and single["num_processes"] == 1
    # Every rank applied the identical update: bit-identical replicas, and no gradient anywhere.
    for a, b in zip(r0["params"] + r0["hessian"], r1["params"] + r1["hessian"], strict=True):
        assert torch.equal(a, b)
    assert not r0["has_grad"] and not r1["has_grad"]
    # The mean of the per-shard scalars is the combined batch's scalar, up to float rounding of the loss amplified
    # by the finite difference (1 / zo_eps): measured 1.4e-5 (BERT, loss 0.69) and 1.8e-4 (LM, loss 4.2) after four
    # steps, against 1.1e-2 had the LM's scalars been plain per-rank means and 3.7e-2 had "plain" kept the Trainer's
    # factor of two; and far below how far the parameters moved.
    tol = 1e-3 if variant == "plain_lm" else 1e-4
    assert r0["moved"] > 50 * tol
    for a, b in zip(r0["params"], single["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=tol)
    for a, b in zip(r0["hessian"], single["hessian"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-7)
    # The logged loss is the combined batch's loss, not scaled by the number of processes; the `zo/*` metrics are
    # those of one process too (`zo/scalar_*` were once logged from a rank's own, Trainer-scaled slopes: 2x).
    assert r0["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert [sorted(h) for h in r0["zo_logs"]] == [sorted(h) for h in single["zo_logs"]]
    for h, ref in zip(r0["zo_logs"], single["zo_logs"], strict=True):
        assert "zo/scalar_abs_mean" in ref and "zo/scalar_rms" in ref
        for key, value in ref.items():
            # The scalars carry the loss's float rounding times 1 / zo_eps: measured 5.6e-5 apart ("plain", 0.05).
            assert h[key] == pytest.approx(value, rel=10 * tol, abs=2 * tol), key


def test_only_the_scalars_travel_per_step(two_processes):
    for variant in VARIANTS:
        r0 = torch.load(two_processes / f"{variant}_rank0.pt")
        calls = r0["calls"]
        assert r0["wrapper"] != "DistributedDataParallel"
        # No DDP parameter / buffer synchronisation and no gradient all-reduce.
        assert not [c for c in calls if c["op"] == "_broadcast_coalesced"]
        # One broadcast per tensor at the start (identical replicas, as DDP would do once), and none after.
        broadcasts = [c for c in calls if c["op"] == "broadcast"]
        assert sum(c["numel"] for c in broadcasts) == r0["num_states"]
        first_other = next(i for i, c in enumerate(calls) if c["op"] != "broadcast")
        assert all(c["op"] != "broadcast" for c in calls[first_other:])
        # Per step: exactly one all-reduce, of the P scalars; everything else is a logging scalar (loss, FLOs, token
        # count) of a few elements.
        per_step = calls[first_other:]
        reduces = [c for c in per_step if c["op"] == "all_reduce"]
        assert [c["numel"] for c in reduces] == [P if variant == "hiso" else 5] * STEPS
        assert max(c["numel"] for c in per_step) <= 5


@pytest.fixture(scope="module")
def federated_one_process(tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("fed_one"))
    return {variant: train_federated(variant, out) for variant in ("fed", "fed_tau1")}


def _assert_same_logs(logs, reference, skip=()):
    assert [sorted(h) for h in logs] == [sorted(h) for h in reference]
    for h, ref in zip(logs, reference, strict=True):
        for key, value in ref.items():
            if key in skip:
                continue
            # NaN where a client's NaN report fell into the logging window (zo/* statistics of reported slopes).
            assert h[key] == pytest.approx(value, rel=1e-9, abs=0, nan_ok=True), key


@pytest.mark.parametrize("variant", FED_VARIANTS)
def test_federated_two_processes_equal_one_process(two_processes, federated_one_process, variant):
    r0, r1 = (torch.load(two_processes / f"{variant}_rank{r}.pt", weights_only=False) for r in (0, 1))
    single = federated_one_process["fed_tau1" if variant == "fed_tau1" else "fed"]
    assert r0["num_processes"] == 2 and single["num_processes"] == 1
    # The setting exercises what it should: unequal work, dropped and rejected reports, every round run.
    assert single["counters"][0] > 0 and (single["counters"][1] > 0 or variant == "fed_tau1")
    # num_train_epochs=1 gives the same number of rounds as in one process (the Trainer's batches are not sharded).
    assert r0["global_step"] == r1["global_step"] == single["global_step"] == FED_EXAMPLES // FED_BATCH
    for a, b in zip(r0["params"] + r0["hessian"], r1["params"] + r1["hessian"], strict=True):
        assert torch.equal(a, b)
    assert single["moved"] > 1e-2
    for a, b in zip(r0["params"], single["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(r0["hessian"], single["hessian"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    for r in (r0, r1):
        assert r["ledger"] == single["ledger"] and r["summary"] == single["summary"]
        assert r["counters"] == single["counters"] and r["positions"] == single["positions"]
        # The forward-pass counter is checkpointed with the optimizer, so a resumed run logs the same counts too.
        _assert_same_logs(r["logs"], single["logs"])
    # Each rank ran only its share of the clients (rank 0 more: 3 per round, or fewer after faults); together, all.
    first = FED_SAVE if variant == "fed_resume" else 0
    assert sorted(r0["reported"] + r1["reported"]) == [r for r in sorted(single["reported"]) if r >= first]
    assert 0 < len(r1["reported"]) < len(r0["reported"])
    if variant == "fed":
        # Rank 0's checkpoint holds the federation of one process: positions of every client, ledger, sampler.
        ckpt, ref = r0["checkpoint"], single["checkpoint"]
        assert ckpt["clients"] == ref["clients"] and ckpt["counters"] == ref["counters"]
        assert ckpt["server"]["round_idx"] == ref["server"]["round_idx"] == FED_SAVE
        assert ckpt["server"]["last_sync"] == ref["server"]["last_sync"]
        assert ckpt["server"]["rng"] == ref["server"]["rng"]
        assert [h["seeds"] for h in ckpt["server"]["history"]] == [h["seeds"] for h in ref["server"]["history"]]
        assert ckpt["ledger"] == ref["ledger"] and ckpt["fault_rng"] == ref["fault_rng"]
        # One all-reduce per round, of the round's report table (3 + tau * P values per reporting client); no
        # data-parallel mean of the scalars.
        rows = [single["reported"].count(r) for r in range(FED_EXAMPLES // FED_BATCH)]
        reduces = [c["numel"] for c in r0["calls"] if c["op"] == "all_reduce"]
        assert reduces == [n * (3 + FED["local_steps"] * P) for n in rows if n]


def report() -> None:
    """Prints what the tests assert, as numbers: `python tests/test_distributed.py report`."""
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = launch_two_processes(Path(tmp) / "two")
        (out.parent / "one").mkdir()
        for variant in VARIANTS:
            r0, r1 = (torch.load(out / f"{variant}_rank{r}.pt") for r in (0, 1))
            single = train(variant, str(out.parent / "one"), GLOBAL_BATCH)
            ranks_equal = all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"], strict=True))
            diff = max(float((a - b).abs().max()) for a, b in zip(r0["params"], single["params"], strict=True))
            first = next(i for i, c in enumerate(r0["calls"]) if c["op"] != "broadcast")
            per_step = r0["calls"][first:]
            reduces = [c["numel"] for c in per_step if c["op"] == "all_reduce"]
            others = sorted({(c["op"], c["numel"]) for c in per_step if c["op"] != "all_reduce"})
            print(
                f"{variant}: ranks bit-identical={ranks_equal}; max |x_2proc - x_1proc| = {diff:.2e} "
                f"(parameters moved up to {r0['moved']:.2e}); logged loss 2proc {r0['losses'][-1]:.6f} vs 1proc "
                f"{single['losses'][-1]:.6f}; wrapper {r0['wrapper']}; one-time broadcast "
                f"{sum(c['numel'] for c in r0['calls'][:first])} values; all_reduce sizes over {STEPS} steps "
                f"{reduces}; other collectives (op, elements) {others}"
            )
        singles = {v: train_federated(v, str(out.parent / "one")) for v in ("fed", "fed_tau1")}
        for variant in FED_VARIANTS:
            single = singles["fed_tau1" if variant == "fed_tau1" else "fed"]
            r0, r1 = (torch.load(out / f"{variant}_rank{r}.pt", weights_only=False) for r in (0, 1))
            pairs = zip(r0["params"] + r0["hessian"], r1["params"] + r1["hessian"], strict=True)
            ranks_equal = all(torch.equal(a, b) for a, b in pairs)
            diff = max(float((a - b).abs().max()) for a, b in zip(r0["params"], single["params"], strict=True))
            hdiff = max(float((a - b).abs().max()) for a, b in zip(r0["hessian"], single["hessian"], strict=True))
            print(
                f"{variant}: {r0['global_step']} rounds (1 process: {single['global_step']}); ranks bit-identical="
                f"{ranks_equal}; max |x_2proc - x_1proc| = {diff:.2e}, max |H_2proc - H_1proc| = {hdiff:.2e} "
                f"(parameters moved up to {single['moved']:.2e}); clients run by rank 0 / rank 1: "
                f"{len(r0['reported'])} / {len(r1['reported'])}; rejected, dropped, empty: {r0['counters']}; "
                f"ledger equal={r0['ledger'] == single['ledger']}; all_reduce sizes "
                f"{[c['numel'] for c in r0['calls'] if c['op'] == 'all_reduce']}"
            )


if __name__ == "__main__":
    if sys.argv[1] == "report":
        report()
    else:
        worker(sys.argv[1])
