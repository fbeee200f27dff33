"""The plain class swap with the script's own learning rate: `Trainer` -> `HiSoTrainer` in a script written like the
transformers examples (MiniLM for sequence classification on the tweets, batch 16, max length 32, the Trainer's
linear schedule), for 200 steps, with the default estimator (HiSo's defaults) and with `zo_estimator="normalized"`.

Runs: full fine-tuning at lr 2e-5 and 5e-5, LoRA (r = 8 on query/value, the classifier trained) at 1e-4 and 1e-3.
Each prints the validation loss and accuracy (first 512 validation texts) before and after, and the mean training
loss of the first and last 20 steps.

    PYTHONPATH=. python -m benchmarks.estimator_swap [--runs full:2e-5:default ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
from transformers import AutoTokenizer, TrainingArguments

from benchmarks.common import RESULTS_DIR, load_minilm, write_json
from hf_hiso import HiSoConfig, HiSoTrainer
from hf_hiso.embedded import load_tweets_sentiment, minilm_path

OUT = RESULTS_DIR / "estimators" / "swap"
RUNS = [f"{kind}:{lr}:{est}" for kind, lr in (("full", "2e-5"), ("full", "5e-5"), ("lora", "1e-4"), ("lora", "1e-3"))
        for est in ("default", "normalized")]  # fmt: skip
STEPS, EVAL_N = 200, 512


def build(kind: str) -> torch.nn.Module:
    model = load_minilm(2)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
        model = get_peft_model(model, cfg)
    return model


def run(kind: str, lr: float, estimator: str) -> dict:
    torch.manual_seed(0)  # the script's own seeding of the new classifier, as `Trainer` scripts do via `set_seed`
    data = load_tweets_sentiment(seed=0)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    data = data.map(lambda b: tok(b["text"], truncation=True, max_length=32, padding="max_length"), batched=True)
    data = data.remove_columns(["text"]).rename_column("label", "labels")
    val = data["validation"].select(range(EVAL_N))
    model = build(kind)
    common = {
        "output_dir": tempfile.mkdtemp(),
        "learning_rate": lr,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 128,
        "max_steps": STEPS,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        "disable_tqdm": True,
        "use_cpu": True,
    }
    # The default arm is the literal swap (a plain TrainingArguments); the other sets one field of HiSoConfig.
    args = TrainingArguments(**common) if estimator == "default" else HiSoConfig(**common, zo_estimator=estimator)

    def metrics(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    trainer = HiSoTrainer(
        model=model, args=args, train_dataset=data["train"], eval_dataset=val, compute_metrics=metrics
    )
    before = trainer.evaluate()
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    after = trainer.evaluate()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "kind": kind,
        "lr": lr,
        "estimator": estimator,
        "eval_loss": [before["eval_loss"], after["eval_loss"]],
        "eval_accuracy": [before["eval_accuracy"], after["eval_accuracy"]],
        "train_loss_first20": statistics.fmean(losses[:20]),
        "train_loss_last20": statistics.fmean(losses[-20:]),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", default=RUNS, help="kind:lr:estimator, e.g. full:2e-5:normalized")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for spec in args.runs:
        kind, lr, est = spec.split(":")
        path = OUT / f"{kind}_lr{lr}_{est}.json"
        if path.exists():
            continue
        out = run(kind, float(lr), est)
        write_json(path, out)
        print(
            f"{spec}: eval loss {out['eval_loss'][0]:.4f} -> {out['eval_loss'][1]:.4f}, accuracy "
            f"{out['eval_accuracy'][0]:.3f} -> {out['eval_accuracy'][1]:.3f}, train loss first/last 20 steps "
            f"{out['train_loss_first20']:.4f} / {out['train_loss_last20']:.4f} ({out['seconds']:.0f}s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
