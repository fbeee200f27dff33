"""Catch-up cost: a client that missed `n` rounds replays them from seeds and scalars, or downloads the model.

For each trainable set of the packaged all-MiniLM-L6-v2 (full model; LoRA r = 8 on query/value + classifier; pooler +
classifier, the convergence benchmark's set; classifier only):

* **Replay** (`hf_hiso.federated.protocol.replay`): measured wall time to apply `n` missed rounds (P = 5, tau = 1: per
  round, regenerate the 5 directions, apply the update, update H) and the bytes of its downlink as the
  `CommunicationLedger` counts them (`n * (tau * 8 + tau * P * 4)`). The replayed replica is checked to be
  bit-identical to the server's, which applied the same rounds as they happened.
* **Download**: bytes of the trainable parameters in float32 (`4 d`; HiSo's client also needs `H`, another `4 d`,
  since H is never transmitted otherwise), and the measured time to read them from a local safetensors file and
  `load_state_dict` them (page cache warm: the network transfer is not measured; the time it would take at a given
  bandwidth is printed as arithmetic, labelled as such).

Wall times on a shared machine include waiting for a core, so CPU times (`time.process_time`, one torch thread) are
recorded beside them and used for the break-even counts.
The history's scalars are random (their values do not change the cost); the learning rate is small so the replayed
model stays sane.

    python benchmarks/catchup.py            # a few minutes on 2 cores
    python benchmarks/catchup.py --quick    # tiny BERT from a config, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import RESULTS_DIR, load_minilm, machine, write_json  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from hf_hiso import HiSoOptimizer  # noqa: E402
from hf_hiso.federated.ledger import CommunicationLedger  # noqa: E402
from hf_hiso.federated.protocol import RoundRecord, apply_round, replay  # noqa: E402
from hf_hiso.zo_estimators import step_seed  # noqa: E402

P, TAU, LR = 5, 1, 1e-6
SETUPS = ("full", "lora", "pooler_head", "head")
BANDWIDTHS = {"10 MB/s": 10e6, "100 MB/s": 100e6}


def build(setup: str, quick: bool) -> torch.nn.Module:
    if quick:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import tiny_bert

        model = tiny_bert()
    else:
        model = load_minilm(2)
    if setup == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"),
        )
    elif setup in ("head", "pooler_head"):
        # "pooler_head" is the trainable set of the convergence benchmark.
        prefixes = ("classifier",) if setup == "head" else ("classifier", "bert.pooler")
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(prefixes))
    return model.eval()


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def history(n: int, seed: int = 0) -> list[RoundRecord]:
    gen = torch.Generator().manual_seed(seed)
    return [RoundRecord(r, [step_seed(seed, r)], torch.randn(TAU, P, generator=gen), [LR]) for r in range(n)]


def measure(setup: str, rounds: list[int], quick: bool, reps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    server_model, client_model = build(setup, quick), build(setup, quick)
    client_model.load_state_dict(server_model.state_dict())
    server_params, client_params = trainable(server_model), trainable(client_model)
    d = sum(p.numel() for p in server_params.values())
    ledger = CommunicationLedger(num_trainable_params=d, num_directions=P, local_steps=TAU)
    out: dict[str, Any] = {"setup": setup, "num_trainable": d, "replay": [], "download": {}}

    # Correctness: the server applies the rounds as they happen; the late client replays them all at once.
    n_check = min(rounds[-1], 20)
    server_opt = HiSoOptimizer(list(server_params.values()), lr=LR, num_directions=P)
    client_opt = HiSoOptimizer(list(client_params.values()), lr=LR, num_directions=P)
    for record in history(n_check):
        apply_round(server_opt, record)
    replay(client_opt, history(n_check))
    same = all(torch.equal(server_params[k], client_params[k]) for k in server_params)
    same_h = all(torch.equal(a, b) for a, b in zip(server_opt.hessian(), client_opt.hessian(), strict=True))
    out["replay_bit_identical"] = {"rounds": n_check, "params": same, "hessian": same_h}

    for n in rounds:
        times, cpu = [], []
        hist = history(n, seed=1)
        for _ in range(reps):
            opt = HiSoOptimizer(list(client_params.values()), lr=LR, num_directions=P)
            t0, c0 = time.perf_counter(), time.process_time()
            replay(opt, hist)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        per_round = statistics.median(times) / n
        out["replay"].append(
            {
                "missed_rounds": n,
                "seconds": statistics.median(times),
                "seconds_per_round": per_round,
                "cpu_seconds": statistics.median(cpu),
                "bytes": n * ledger.catchup_bytes_per_missed_round,
            }
        )
        print(
            f"  {setup:5s} d={d:>10,d}  replay {n:>5d} rounds: {statistics.median(times):8.3f} s wall, "
            f"{statistics.median(cpu):8.3f} s cpu ({statistics.median(cpu) / n * 1e3:.2f} ms cpu/round), "
            f"{n * ledger.catchup_bytes_per_missed_round:>8,d} B",
            flush=True,
        )

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trainable.safetensors"
        save_file({k: v.detach().contiguous() for k, v in server_params.items()}, str(path))
        load_times, load_cpu = [], []
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            state = load_file(str(path))
            client_model.load_state_dict(state, strict=False)
            load_times.append(time.perf_counter() - t0)
            load_cpu.append(time.process_time() - c0)
    load_s = statistics.median(load_times)
    out["download"] = {
        "bytes_params": 4 * d,
        "bytes_params_and_hessian": 8 * d,
        "load_seconds": load_s,
        "load_cpu_seconds": statistics.median(load_cpu),
        "transfer_seconds_at": {k: 4 * d / v for k, v in BANDWIDTHS.items()},
    }
    # Per-round replay cost from the largest n (least timer overhead), in CPU time (robust to a shared machine).
    last = out["replay"][-1]
    per_round = last["cpu_seconds"] / last["missed_rounds"]
    load_cpu_s = out["download"]["load_cpu_seconds"]
    per_round_bytes = ledger.catchup_bytes_per_missed_round
    out["break_even_rounds"] = {
        "bytes_vs_params": 4 * d / per_round_bytes,
        "bytes_vs_params_and_hessian": 8 * d / per_round_bytes,
        "cpu_time_vs_local_load": load_cpu_s / per_round,
        **{f"time_vs_load_plus_transfer_{k}": (load_cpu_s + 4 * d / v) / per_round for k, v in BANDWIDTHS.items()},
    }
    be = out["break_even_rounds"]
    print(
        f"  {setup:5s} download: {4 * d:,d} B params (+H: {8 * d:,d} B); load from a local file {load_s * 1e3:.1f} ms "
        f"wall, {load_cpu_s * 1e3:.1f} ms cpu. Replay is cheaper in bytes below {be['bytes_vs_params']:,.0f} missed "
        f"rounds ({be['bytes_vs_params_and_hessian']:,.0f} counting H); in time below "
        f"{be['cpu_time_vs_local_load']:,.3g} (vs the local load alone) / "
        + " / ".join(f"{be[f'time_vs_load_plus_transfer_{k}']:,.3g} (+ transfer at {k})" for k in BANDWIDTHS),
        flush=True,
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output-json", type=Path, default=None)
    parser.add_argument(
        "--setups",
        nargs="*",
        default=None,
        help="only these (full, lora, pooler_head, head); others kept from the JSON",
    )
    args = parser.parse_args(argv)
    # One thread: on a shared machine a second torch thread spin-waits for a core, which inflates both wall and CPU
    # time; single-threaded CPU time is the stable figure.
    torch.set_num_threads(1)
    print(f"machine: {machine()}; P = {P}, tau = {TAU}, float32")
    if args.quick:
        plan = {"full": [1, 10], "lora": [1, 10], "pooler_head": [1, 10], "head": [1, 10]}
        reps = 1
    else:
        plan = {"full": [1, 2, 4], "lora": [1, 10, 100], "pooler_head": [1, 10, 100], "head": [1, 10, 100, 1000]}
        reps = 3
    if args.setups:
        plan = {k: v for k, v in plan.items() if k in args.setups}
    path = args.output_json or RESULTS_DIR / "catchup" / ("quick.json" if args.quick else "full.json")
    kept = []
    if args.setups and path.exists():
        kept = [s for s in json.loads(path.read_text())["setups"] if s["setup"] not in plan]
    measured = [measure(s, r, args.quick, reps) for s, r in plan.items()]
    order = list(SETUPS)
    results = {
        "machine": machine(),
        "P": P,
        "tau": TAU,
        "setups": sorted(kept + measured, key=lambda s: order.index(s["setup"])),
    }
    write_json(path, results)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
