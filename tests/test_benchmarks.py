"""The benchmark scripts keep working: their short modes (slow-marked) and the cached-encoder identity (fast)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from common import FrozenEncoderHead, encode_cls  # noqa: E402


def test_cached_head_equals_full_forward():
    """The frozen encoder's cached [CLS] states + FrozenEncoderHead give the full model's logits and loss in eval
    mode: the speed trick of the convergence benchmark changes nothing."""
    model = tiny_bert(num_labels=3).eval()
    g = torch.Generator().manual_seed(0)
    tokens = {"input_ids": torch.randint(2, 64, (12, 8), generator=g), "attention_mask": torch.ones(12, 8, dtype=int)}
    tokens["attention_mask"][:4, 5:] = 0  # padded examples too
    labels = torch.randint(0, 3, (12,), generator=g)
    cls = encode_cls(model, tokens, batch_size=5)  # another batch size than the full forward below
    head = FrozenEncoderHead(model.bert.pooler.dense.state_dict(), 3, seed=1, cls_table=cls).eval()
    model.classifier.load_state_dict(head.classifier.state_dict())
    with torch.no_grad():
        full = model(**tokens, labels=labels)
        cached = head(features=cls, labels=labels)
        by_id = head(example_id=torch.arange(12).flip(0), labels=labels.flip(0))
    torch.testing.assert_close(cached.logits, full.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(cached.loss, full.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(by_id.logits, cached.logits.flip(0), rtol=0, atol=0)
    # Only the pooler and classifier train; the head starts as `from_pretrained` initialises a new classifier.
    assert float(head.classifier.bias.detach().abs().max()) == 0.0
    frozen = FrozenEncoderHead(model.bert.pooler.dense.state_dict(), 3, seed=1, train_pooler=False)
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == ["classifier.weight", "classifier.bias"]


def _read_runs(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/*/*.json"))]


@pytest.mark.slow
def test_convergence_short_mode(tmp_path, capsys):
    import convergence

    results, docs = tmp_path / "results", tmp_path / "docs"
    argv = ["--mode", "short", "--results-dir", str(results), "--docs-dir", str(docs)]
    convergence.main(argv)
    mode = convergence.MODES["short"]
    planned = list(convergence.planned_runs(mode))
    runs = _read_runs(results)
    assert len(runs) == len(planned)
    # Resumable: a second call finds every run done and runs nothing.
    capsys.readouterr()
    convergence.main(argv)
    assert f"{len(planned)} already done, 0 to do" in capsys.readouterr().out
    # Same federation for every federated method of a seed: same shards; HiSo and DeComFL move the same bytes.
    by = {(r["method"], r["lr"]): r for r in runs}
    lr = mode.zo_lrs[0]
    assert by[("hiso", lr)]["client_sizes"] == by[("decomfl", lr)]["client_sizes"]
    assert by[("fedavg", mode.fedavg_lrs[0])]["client_sizes"] == by[("hiso", lr)]["client_sizes"]
    assert [h["bytes_total"] for h in by[("hiso", lr)]["history"]] == [
        h["bytes_total"] for h in by[("decomfl", lr)]["history"]
    ]
    # Bytes per round follow the ledger's formula: 2 clients x (5 scalars x 4 B up + one 8 B seed down), plus
    # catch-up; FedAvg moves two copies of the trainable parameters per sampled client.
    hist = by[("hiso", lr)]["history"]
    assert hist[-1]["bytes_total"] >= hist[-1]["round"] * 2 * (5 * 4 + 8)
    d = by[("fedavg", mode.fedavg_lrs[0])]["num_trainable"]
    fa = by[("fedavg", mode.fedavg_lrs[0])]["history"][-1]
    assert fa["bytes_total"] == fa["round"] * 2 * 2 * d * 4
    for r in runs:
        assert r["history"][-1]["round"] == r["rounds"] or r["diverged"]
    report = json.loads((results / "report.json").read_text())
    assert set(report["tweets_sentiment/paper"]["best_lr"]) == {"hiso", "decomfl", "mezo", "fedavg"}
    assert (docs / "convergence_short_tweets_sentiment_paper.png").stat().st_size > 0


@pytest.mark.slow
def test_cached_head_matches_minilm():
    import common

    diff = common.check_cached_head_matches_model("tweets_sentiment", limit=64)
    assert diff["max_abs_logit_diff"] < 1e-5 and diff["abs_loss_diff"] < 1e-5


@pytest.mark.slow
def test_controlled_quick(tmp_path):
    import controlled

    controlled.main(["--quick", "--results-dir", str(tmp_path), "--docs-dir", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    hard = report["100"]
    # The true curvature as preconditioner must reach the target, and faster than no preconditioner.
    assert hard["oracle"]["median_steps"] is not None
    plain = hard["plain"]["median_steps"] or float("inf")
    assert hard["oracle"]["median_steps"] < plain
    assert (tmp_path / "controlled_quick.png").exists()


@pytest.mark.slow
def test_catchup_quick(tmp_path):
    import catchup

    out = tmp_path / "catchup.json"
    catchup.main(["--quick", "--output-json", str(out)])
    res = json.loads(out.read_text())
    for setup in res["setups"]:
        assert setup["replay_bit_identical"]["params"] and setup["replay_bit_identical"]["hessian"]
        for row in setup["replay"]:
            assert row["bytes"] == row["missed_rounds"] * (8 + 5 * 4)
        assert setup["download"]["bytes_params"] == 4 * setup["num_trainable"]


@pytest.mark.slow
def test_ablation_short(tmp_path):
    import ablation

    ablation.main(["--mode", "short", "--lr", "0.3", "--results-dir", str(tmp_path), "--docs-dir", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == set(ablation.SETTINGS["short"]["variants"])
    look = json.loads((tmp_path / "preconditioner_head.json").read_text())
    assert look["tensors"]["classifier.weight"]["numel"] == 2 * 384
    # The closed-form Hessian diagonal agrees with autograd's Hessian-vector products.
    assert look["diag_check_max_rel_error"] < 1e-3
    assert (tmp_path / "ablation_short.png").exists()


def test_energy_weights_simulation_weighting_beats_unweighted():
    """`benchmarks/energy_weights.py`: over 10 simulated runs of the LoRA + head blocks, the energy target's weighted
    regression leaves fewer runs with a learned H that does not make every LoRA role 10x shorter than the head."""
    import energy_weights

    def bad(floor, power):
        runs = [energy_weights.simulate(floor, power, seed) for seed in range(10)]
        return sum(1 for ratio, head, _ in runs if ratio < 10 or head > 3)

    assert bad(1e-2, 2) < bad(1.0, 0)


def test_curvature_lora_seed_report(tmp_path, capsys):
    """`curvature_lora.py --seed-report`: seed means per configuration, the seed taken from the record or the file
    name, stopped runs (fewer than 300 steps) left out, and the step at which the seed-mean curve reaches the
    head-alone runs' mean at their last step."""
    import curvature_lora

    def record(method, accs, **extra):
        evals = [{"step": 100 * i, "passes": 600 * i, "accuracy": a} for i, a in enumerate(accs)]
        return {"method": method, "lr": 0.1, "evals": evals, **extra}

    (tmp_path / "head_lr0.1.json").write_text(json.dumps(record("head", [0.5, 0.7, 0.74, 0.78])))
    (tmp_path / "head_lr0.1_s1.json").write_text(json.dumps(record("head", [0.5, 0.7, 0.74, 0.76])))
    runs = {"energy_a.json": ([0.5, 0.7, 0.78, 0.8], 0), "energy_b.json": ([0.5, 0.72, 0.76, 0.78], 1)}
    for name, (accs, seed) in runs.items():
        (tmp_path / name).write_text(json.dumps(record("energy", accs, seed=seed, blocks="role")))
    (tmp_path / "energy_stopped.json").write_text(json.dumps(record("energy", [0.5, 0.3], seed=2, blocks="role")))
    table = curvature_lora.seed_report([tmp_path])
    head, energy = table["head 0.1"], table["energy 0.1/role"]
    assert head["seeds"] == [0, 1] and energy["seeds"] == [0, 1]
    assert energy["accuracy"][200]["mean"] == pytest.approx(0.77)
    assert energy["reach_head"] == 200 and head["reach_head"] == 300  # the target is the head's mean 0.77
    assert "energy" in capsys.readouterr().out
