"""examples/run_glue.py end to end on a tiny BERT and tokenizer built locally, plus its input checks.

The tiny model and tokenizer are saved to a temporary folder and passed with `--model_name_or_path`, the data as
csv files, so nothing is downloaded and a run takes seconds.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_bert
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertTokenizer

from hf_hiso import FederatedZOCallback, HiSoTrainer

ROOT = Path(__file__).resolve().parent.parent
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["good", "bad"] + [f"w{i}" for i in range(VOCAB - len(SPECIAL) - 2)]
MAX_LEN = 16


def load_run_glue():
    """The example as a module (it is a script, not part of the package)."""
    if "run_glue" in sys.modules:
        return sys.modules["run_glue"]
    spec = importlib.util.spec_from_file_location("run_glue", ROOT / "examples" / "run_glue.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_glue"] = module
    spec.loader.exec_module(module)
    return module


def make_tiny_text_model(folder: Path) -> Path:
    """Saves `tiny_bert()` and a `BertTokenizer` over a 64-word vocabulary into `folder`."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    assert len(vocab) == VOCAB
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=MAX_LEN)
    tiny_bert().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_text_rows(n: int, seed: int) -> list[dict[str, object]]:
    """Sentences whose label is whether the word "good" (else "bad") occurs in them."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = [rng.choice(WORDS[2:]) for _ in range(6)]
        words.insert(rng.randint(0, 6), "good" if label else "bad")
        rows.append({"sentence": " ".join(words), "label": label})
    return rows


def write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model gains nothing from intra-op threads, and on a shared 2-core machine their synchronisation
    costs more than the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("run_glue")
    return {
        "model": make_tiny_text_model(root / "tiny-bert"),
        "train": write_csv(root / "train.csv", make_text_rows(64, seed=0)),
        "validation": write_csv(root / "dev.csv", make_text_rows(32, seed=1)),
        "root": root,
    }


def tiny_argv(setup: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(setup["model"]),
        "--train_file", str(setup["train"]),
        "--validation_file", str(setup["validation"]),
        "--max_seq_length", str(MAX_LEN),
        "--output_dir", str(out),
        "--max_steps", "4",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "32",
        "--learning_rate", "0.05",
        "--logging_steps", "2",
        "--num_clients", "3",
        "--clients_per_round", "2",
        "--lora_r", "2",
        "--use_cpu", "true",
        "--disable_tqdm", "true",
        "--dataloader_num_workers", "0",
        "--head", "fresh",  # the classifier-on-[CLS] path with an adapter; tests/test_heads.py runs the default head
        *extra,
    ]  # fmt: skip


@pytest.fixture
def no_training(monkeypatch):
    """Makes any call to `HiSoTrainer.train` fail the test: bad input must be refused before training."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started although the input was invalid")

    monkeypatch.setattr(HiSoTrainer, "train", refuse)


def predictions(model, tokenizer, texts: list[str]) -> torch.Tensor:
    model.eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


# ---- end to end -------------------------------------------------------------------------------------------------


def test_end_to_end_federated_peft_and_adapter_reload(tiny_setup, tmp_path, capsys):
    run_glue = load_run_glue()
    out = tmp_path / "out"
    trainer, summary = run_glue.run(tiny_argv(tiny_setup, out))

    # Federated over 3 clients, one round per step, with a LoRA adapter.
    fed = summary["federation"]
    assert fed["num_clients"] == 3 and fed["clients_per_round"] == 2 and fed["rounds"] == 4
    ledger = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, FederatedZOCallback)).ledger
    assert fed["bytes_total"] == ledger.bytes_total > 0
    assert summary["trainable_params"] < summary["total_params"] / 2
    for key in ("eval_accuracy", "eval_f1", "eval_loss"):
        assert key in summary["before"] and key in summary["after"]
    assert summary["metrics_by"] in ("evaluate", "scikit-learn")

    # The summary printed for humans carries the same figures.
    printed = capsys.readouterr().out
    assert "run_glue summary" in printed and f"{fed['bytes_total']:,} B" in printed
    assert f"{summary['after']['eval_accuracy']:.4f}" in printed

    # What was saved: the adapter, tokenizer, card, its inputs and the results.
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "hiso_card.json",
        "all_results.json",
    ):
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors").exists()
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_loss"] == pytest.approx(summary["after"]["eval_loss"])
    assert summary["after"]["eval_loss"] != summary["before"]["eval_loss"]
    before = json.loads((out / "eval_before_results.json").read_text())
    assert before["eval_loss"] == pytest.approx(summary["before"]["eval_loss"])
    assert results["bytes_total"] == fed["bytes_total"]
    card = (out / "README.md").read_text()
    assert f"{fed['bytes_total']:,} B" in card and "federated-learning" in card

    # The adapter reloads onto the base model and predicts exactly what the trained model predicts.
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = [row["sentence"] for row in make_text_rows(8, seed=5)]
    expected = predictions(trainer.model, tokenizer, texts)
    from peft import PeftModel

    base = AutoModelForSequenceClassification.from_pretrained(tiny_setup["model"])
    reloaded = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(predictions(reloaded, tokenizer, texts), expected)
    # ... and training moved the adapter: the untouched base model predicts something else.
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_setup["model"])
    assert not torch.allclose(predictions(fresh, tokenizer, texts), expected)


def test_centralized_full_model(tiny_setup, tmp_path):
    run_glue = load_run_glue()
    out = tmp_path / "out"
    trainer, summary = run_glue.run(
        tiny_argv(tiny_setup, out, "--num_clients", "0", "--use_peft", "false", "--max_steps", "2")
    )
    assert summary["federation"] is None
    assert summary["trainable_params"] == summary["total_params"]
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert trainer.state.global_step == 2


# ---- arguments ----------------------------------------------------------------------------------------------------


def test_no_arguments_is_the_embedded_default():
    run_glue = load_run_glue()
    model_args, data_args, peft_args, fed_args, training_args = run_glue.parse_args([])
    assert model_args.model_name_or_path is None  # the embedded MiniLM
    assert data_args.task_name == "tweets_sentiment"
    assert peft_args.use_peft and fed_args.num_clients > fed_args.clients_per_round > 0
    assert fed_args.partition == "dirichlet"
    parsed = (model_args, data_args, peft_args, fed_args, training_args)
    for key, value in run_glue.EXAMPLE_DEFAULTS.items():
        owner = next(obj for obj in parsed if hasattr(obj, key))
        assert getattr(owner, key) == value or key == "report_to", key
    # A single option keeps every other default of the embedded run.
    *_, fed2, args2 = run_glue.parse_args(["--max_steps", "7"])
    assert args2.max_steps == 7 and args2.learning_rate == run_glue.EXAMPLE_DEFAULTS["learning_rate"]
    assert fed2.num_clients == fed_args.num_clients


def test_arguments_from_a_json_file(tmp_path):
    run_glue = load_run_glue()
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"task_name": "bbc_news", "num_clients": 0, "lora_r": 4, "zo_num_directions": 3}))
    model_args, data_args, peft_args, fed_args, training_args = run_glue.parse_args([str(path)])
    assert data_args.task_name == "bbc_news" and fed_args.num_clients == 0 and peft_args.lora_r == 4
    assert training_args.zo_num_directions == 3
    assert training_args.output_dir == run_glue.EXAMPLE_DEFAULTS["output_dir"]


# ---- bad input: clear errors before training ------------------------------------------------------------------------


def test_unknown_task(no_training):
    run_glue = load_run_glue()
    with pytest.raises(ValueError, match="Unknown --task_name 'sst3'") as err:
        run_glue.run(["--task_name", "sst3"])
    for name in ("sst2", "tweets_sentiment", "bbc_news", "--train_file"):
        assert name in str(err.value)


def test_missing_file(tmp_path, no_training):
    run_glue = load_run_glue()
    with pytest.raises(FileNotFoundError, match="--train_file .*does not exist"):
        run_glue.run(["--train_file", str(tmp_path / "nope.csv")])


def test_wrong_file_format(tmp_path, no_training):
    run_glue = load_run_glue()
    path = tmp_path / "train.txt"
    path.write_text("hello\n")
    with pytest.raises(ValueError, match="csv, json or jsonl"):
        run_glue.run(["--train_file", str(path)])


def test_file_without_label_column(tiny_setup, tmp_path, no_training):
    run_glue = load_run_glue()
    rows = [{"sentence": r["sentence"], "target": r["label"]} for r in make_text_rows(16, seed=2)]
    train = write_csv(tmp_path / "train.csv", rows)
    argv = tiny_argv(tiny_setup, tmp_path / "out")
    argv[argv.index("--train_file") + 1] = str(train)
    with pytest.raises(ValueError, match="no label column 'label'.*target.*--label_column_name"):
        run_glue.run(argv)
    # Naming the column fixes it up to the validation file, which still lacks it.
    with pytest.raises(ValueError, match="validation data .*no label column 'target'"):
        run_glue.run([*argv, "--label_column_name", "target"])


def test_peft_target_module_that_does_not_exist(tiny_setup, tmp_path, no_training):
    run_glue = load_run_glue()
    argv = tiny_argv(tiny_setup, tmp_path / "out", "--lora_target_modules", "query", "q_proj")
    with pytest.raises(ValueError, match=r"--lora_target_modules names module\(s\) \['q_proj'\]") as err:
        run_glue.run(argv)
    assert "query" in str(err.value)  # the names the model does have are listed
    with pytest.raises(ValueError, match="--modules_to_save"):
        run_glue.run(tiny_argv(tiny_setup, tmp_path / "out", "--modules_to_save", "score_head"))
    with pytest.raises(ValueError, match="--lora_layers"):
        run_glue.run(tiny_argv(tiny_setup, tmp_path / "out", "--lora_layers", "7"))


def test_glue_task_offline_names_the_alternatives(monkeypatch, tmp_path, no_training):
    run_glue = load_run_glue()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def unreachable(*args, **kwargs):
        raise ConnectionError("no connection to the dataset hub")

    # Offline `datasets` fails on its own; the patch also covers a machine whose cache holds GLUE.
    monkeypatch.setattr(run_glue, "load_dataset", unreachable)
    with pytest.raises(run_glue.DataUnavailableError) as err:
        run_glue.run(["--task_name", "sst2", "--output_dir", str(tmp_path / "out")])
    message = str(err.value)
    for name in ("sst2", "tweets_sentiment", "bbc_news", "--train_file"):
        assert name in message


def test_federation_settings_are_checked_before_loading(no_training):
    run_glue = load_run_glue()
    with pytest.raises(ValueError, match="clients_per_round"):
        run_glue.run(["--num_clients", "2", "--clients_per_round", "3"])


# ---- metrics ------------------------------------------------------------------------------------------------------


def test_metrics_keys_and_offline_backend():
    import numpy as np
    from transformers import EvalPrediction

    from hf_hiso.metrics import build_compute_metrics

    metrics = build_compute_metrics("tweets_sentiment", num_labels=2)  # the suite runs offline (conftest)
    assert metrics.backend == "scikit-learn" and metrics.keys == ("accuracy", "f1", "macro_f1")
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])  # predicts 0, 1, 0, 1
    labels = np.array([0, 1, 1, 1])
    out = metrics(EvalPrediction(predictions=logits, label_ids=labels))
    # 3 of 4 right; for label 1: 2 true positives, no false positive, 1 false negative -> F1 = 4 / 5; for label 0:
    # precision 1 / 2, recall 1 -> F1 = 2 / 3; macro F1 = (4 / 5 + 2 / 3) / 2.
    assert out == pytest.approx({"accuracy": 0.75, "f1": 0.8, "macro_f1": (0.8 + 2 / 3) / 2})
    assert build_compute_metrics("cola", 2, backend="scikit-learn").keys == ("matthews_correlation",)
    assert build_compute_metrics("mrpc", 2, backend="scikit-learn").keys == ("accuracy", "f1")
    many = build_compute_metrics("bbc_news", 5, backend="scikit-learn")
    logits = np.eye(5)[[0, 1, 2, 3, 4, 0]]
    out = many(EvalPrediction(predictions=logits, label_ids=np.array([0, 1, 2, 3, 4, 1])))
    assert out["accuracy"] == pytest.approx(5 / 6)
    assert 0 < out["f1"] < 1  # macro F1 over the 5 classes
    with pytest.raises(ValueError, match="backend"):
        build_compute_metrics(None, 2, backend="numpy")


def test_csv_text_column_of_any_name_and_blank_label(tiny_setup, tmp_path, no_training):
    # datasets reads CSV text as `large_string`: a `txt,label` file must find its text column by type.
    run_glue = load_run_glue()
    rows = [{"txt": r["sentence"], "label": r["label"]} for r in make_text_rows(16, seed=3)]
    raw = run_glue.load_raw_datasets(
        run_glue.DataTrainingArguments(
            train_file=str(write_csv(tmp_path / "t.csv", rows)), validation_file=str(tmp_path / "t.csv")
        ),
        None,
    )
    data_args = run_glue.DataTrainingArguments(
        train_file=str(tmp_path / "t.csv"), validation_file=str(tmp_path / "t.csv")
    )
    assert run_glue.text_columns(raw, data_args) == ("txt", None)
    # One blank label is an error naming the file and the row, not a silent switch to regression.
    rows[5]["label"] = ""
    train = write_csv(tmp_path / "blank.csv", rows)
    argv = tiny_argv(tiny_setup, tmp_path / "out")
    argv[argv.index("--train_file") + 1] = str(train)
    with pytest.raises(ValueError, match=r"blank\.csv.*blank 'label' in data row 6"):
        run_glue.run(argv)
