"""Shared helpers of the convergence, ablation, catch-up and controlled-problem benchmarks, and the peak-memory
measurement of the memory benchmarks (`step_cost.py`, `llm_memory.py`).

The language-model benchmarks train the classification head (pooler + classifier) of the packaged all-MiniLM-L6-v2
`BertForSequenceClassification` with the encoder frozen. A frozen encoder run in eval mode is a fixed function of the
tokens, so its output (the `[CLS]` hidden state, the pooler's input) is computed once per example and cached; the
trainable part (`FrozenEncoderHead`: pooler `tanh(W h + b)`, dropout, classifier) then runs on the cached states.
`check_cached_head_matches_model` compares its loss and logits with the full model's forward on the same tokens, and
the slow test asserts it (identical up to float32 rounding: the cache is encoded in batches of another size).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch import nn  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
DOCS_DIR = BENCH_DIR.parent / "docs"

# Per task: token length of the cached encoding and validation share. BBC articles are long (their first 128 tokens
# are title and lead, enough for the topic); its validation share is 0.2 so that accuracy moves in steps of 0.2 %,
# not 0.5 %.
TASKS: dict[str, dict[str, Any]] = {
    "tweets_sentiment": {"max_length": 32, "test_size": 0.1},
    "bbc_news": {"max_length": 128, "test_size": 0.2},
}
SPLIT_SEED = 0  # the train/validation split is the same for every run; run seeds vary the federation and the head
INIT_STD = 0.02  # BERT's `initializer_range`: how `from_pretrained` initialises a new classifier


def cache_dir() -> Path:
    root = os.environ.get("HF_HISO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hf_hiso"
    )
    path = Path(root) / "benchmarks"
    path.mkdir(parents=True, exist_ok=True)
    return path


def machine() -> str:
    threads = torch.get_num_threads()
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {threads} threads"


# ---- JSON results, one file per run ---------------------------------------------------------------------------------


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Lays out, writes (creating the folder) and closes a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_json(path: Path, obj: Any) -> None:
    """Writes atomically (temporary file, then rename), so a killed run never leaves a half-written result that a
    resumed sweep would take for a finished one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("+", "").replace("-0", "-")


# ---- the model: packaged MiniLM, encoder frozen ---------------------------------------------------------------------


def load_minilm(num_labels: int, attn_implementation: str | None = None) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    from hf_hiso.embedded import minilm_path

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval()


def tokenize(texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    from hf_hiso.embedded import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    # Fixed-length padding: the cached states and the full-model check see exactly the same token tensors.
    return tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")


@torch.no_grad()
def encode_cls(model: nn.Module, tokens: dict[str, torch.Tensor], batch_size: int = 128) -> torch.Tensor:
    """The frozen encoder's `[CLS]` hidden state (the pooler's input) for every example, in eval mode."""
    model.eval()
    out = []
    n = tokens["input_ids"].shape[0]
    for i in range(0, n, batch_size):
        batch = {k: v[i : i + batch_size] for k, v in tokens.items()}
        out.append(model.bert(**batch).last_hidden_state[:, 0].clone())
    return torch.cat(out)


def load_features(task: str, limit: int | None = None) -> dict[str, Any]:
    """Cached `[CLS]` states, labels and the pretrained pooler of `task` (encoded once, then read from the cache).

    Args:
        task: a name of `TASKS`.
        limit: keep only the first `limit` training and validation examples (the smoke test: encodes only those).
    """
    from hf_hiso.embedded import load_embedded_task

    cfg = TASKS[task]
    data = load_embedded_task(task, seed=SPLIT_SEED, test_size=cfg["test_size"])
    names = data["train"].features["label"].names
    tag = f"{task}_len{cfg['max_length']}_test{cfg['test_size']}_split{SPLIT_SEED}" + (f"_n{limit}" if limit else "")
    path = cache_dir() / f"features_{tag}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    t0 = time.perf_counter()
    model = load_minilm(len(names))
    out: dict[str, Any] = {"task": task, "names": names, "num_labels": len(names), "max_length": cfg["max_length"]}
    for split in ("train", "validation"):
        ds = data[split] if limit is None else data[split].select(range(min(limit, len(data[split]))))
        tokens = tokenize(list(ds["text"]), cfg["max_length"])
        out[split] = {"cls": encode_cls(model, tokens), "labels": torch.tensor(list(ds["label"]), dtype=torch.long)}
    out["pooler"] = {k: v.detach().clone() for k, v in model.bert.pooler.dense.state_dict().items()}
    out["encode_seconds"] = time.perf_counter() - t0
    torch.save(out, path)
    return out


class FrozenEncoderHead(nn.Module):
    """`BertForSequenceClassification`'s head on cached `[CLS]` states: `classifier(dropout(tanh(W h + b)))`.

    With the encoder frozen and in eval mode this is the full model's forward, minus recomputing the encoder. The
    cached states live in a buffer (`cls_table`, not trainable) and the model's input is the example's row in it
    (`example_id`): fetching two integers per example keeps the data pipeline from dominating a round that costs a
    few small matrix products. `features=` takes `[CLS]` states directly instead. `train_pooler=False` freezes the
    pooler too (only the classifier trains).
    """

    def __init__(
        self,
        pooler_state: dict[str, torch.Tensor],
        num_labels: int,
        seed: int,
        train_pooler: bool = True,
        cls_table: torch.Tensor | None = None,
    ):
        super().__init__()
        hidden = pooler_state["weight"].shape[0]
        self.pooler = nn.Linear(hidden, hidden)
        self.pooler.load_state_dict(pooler_state)
        self.pooler.requires_grad_(train_pooler)
        self.dropout = nn.Dropout(0.1)  # MiniLM's hidden_dropout_prob; identity in eval mode (all ZO passes)
        self.classifier = nn.Linear(hidden, num_labels)
        # The initialisation `from_pretrained` gives a new head (normal(0, initializer_range), zero bias), drawn
        # from a private generator so that every method of a seed starts from the same head.
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            self.classifier.weight.copy_(torch.randn(self.classifier.weight.shape, generator=gen) * INIT_STD)
            self.classifier.bias.zero_()
        self.register_buffer("cls_table", cls_table, persistent=False)

    @classmethod
    def from_features(cls, feats: dict[str, Any], seed: int, train_pooler: bool = True) -> FrozenEncoderHead:
        """The head over all cached states of a task: training rows first, then validation rows."""
        table = torch.cat([feats["train"]["cls"], feats["validation"]["cls"]])
        return cls(feats["pooler"], feats["num_labels"], seed, train_pooler, table)

    def forward(
        self,
        example_id: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        if features is None:
            features = self.cls_table[example_id]
        logits = self.classifier(self.dropout(torch.tanh(self.pooler(features))))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def example_ids(feats: dict[str, Any], split: str) -> torch.Tensor:
    """Rows of `split` in `FrozenEncoderHead.from_features`'s table."""
    n_train = len(feats["train"]["labels"])
    n = len(feats[split]["labels"])
    return torch.arange(n) + (0 if split == "train" else n_train)


def features_dataset(feats: dict[str, Any], split: str = "train") -> Dataset:
    """`example_id` and `labels` columns (plain integers; the default collator makes them tensors)."""
    return Dataset.from_dict(
        {"example_id": example_ids(feats, split).tolist(), "labels": feats[split]["labels"].tolist()}
    )


@torch.no_grad()
def check_cached_head_matches_model(
    task: str, num_examples: int = 16, seed: int = 0, limit: int | None = None
) -> dict[str, float]:
    """Max |difference| of logits and loss between the full MiniLM model (eval mode) and `FrozenEncoderHead` on the
    cached `[CLS]` states of the first `num_examples` validation examples, both with the same head weights."""
    from hf_hiso.embedded import load_embedded_task

    cfg = TASKS[task]
    feats = load_features(task, limit=limit)
    data = load_embedded_task(task, seed=SPLIT_SEED, test_size=cfg["test_size"])["validation"]
    data = data.select(range(num_examples))
    model = load_minilm(feats["num_labels"])
    head = FrozenEncoderHead(feats["pooler"], feats["num_labels"], seed).eval()
    model.classifier.load_state_dict(head.classifier.state_dict())
    labels = torch.tensor(list(data["label"]))
    full = model(**tokenize(list(data["text"]), cfg["max_length"]), labels=labels)
    cached = head(features=feats["validation"]["cls"][:num_examples], labels=labels)
    return {
        "max_abs_logit_diff": float((full.logits - cached.logits).abs().max()),
        "abs_loss_diff": float((full.loss - cached.loss).abs()),
        "loss": float(full.loss),
    }


# ---- evaluation during training -------------------------------------------------------------------------------------


@torch.no_grad()
def accuracy(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    out = model(example_id=ids, labels=labels)
    model.train(was_training)
    return float((out.logits.argmax(-1) == labels).float().mean()), float(out.loss)


class EvalCallback(TrainerCallback):
    """Validation accuracy and loss every `every` steps (rounds) and at the start, with the bytes counted so far.

    `bytes_fn` returns the communication totals at that point (or `{}` for centralized training).
    """

    def __init__(
        self,
        ids: torch.Tensor,
        labels: torch.Tensor,
        every: int,
        bytes_fn: Callable[[], dict[str, int]] | None = None,
    ):
        self.ids, self.labels, self.every = ids, labels, every
        self.bytes_fn = bytes_fn or dict
        self.history: list[dict[str, Any]] = []
        self.model: nn.Module | None = None
        self.diverged = False

    def record(self, step: int, model: nn.Module) -> None:
        acc, loss = accuracy(model, self.ids, self.labels)
        self.history.append({"round": step, "accuracy": acc, "val_loss": loss, **self.bytes_fn()})
        if not np.isfinite(loss):
            self.diverged = True

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.record(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.record(state.global_step, model)
            if self.diverged:
                control.should_training_stop = True  # NaN loss: the rest of the run would be NaN too


# ---- peak memory of a short training run, each in a fresh process -----------------------------------------------


def short_run_kwargs(batch_size: int, max_steps: int) -> dict[str, Any]:
    """`TrainingArguments` of a short measurement run on CPU: `max_steps` steps of `batch_size` examples, one log at
    the end, no checkpoint, report, progress bar or data-loading worker, seed 0."""
    return {
        "per_device_train_batch_size": batch_size,
        "max_steps": max_steps,
        "logging_steps": max(1, max_steps),
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.MULTILINE).group(1))


def _reset_peak_rss() -> bool:
    # Linux >= 4.0: writing 5 resets the peak RSS (VmHWM) to the current RSS, so model loading does not hide the peak.
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_during(fn: Callable[[], Any]) -> dict[str, Any]:
    """Runs `fn()` and returns this process's resident memory right before it (`rss_before_bytes`), its peak during
    `fn` (`peak_bytes`), the difference (`increase_bytes`) and whether the peak could be reset first (`peak_reset`;
    Linux `/proc/self/clear_refs`, then `VmHWM`). Without the reset the peak is the process's lifetime peak, so the
    increase is only a lower bound."""
    import resource  # Unix only: imported here so that the other benchmarks import this module anywhere

    rss_before = _status_kib("VmRSS")
    exact = _reset_peak_rss()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    peak = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if not exact:
        # A peak reached before `fn` (model loading) can only bound the increase from below.
        rss_before = max(rss_before, maxrss_before)
    return {
        "rss_before_bytes": rss_before * 1024,
        "peak_bytes": peak * 1024,
        "increase_bytes": (peak - rss_before) * 1024,
        "peak_reset": exact,
    }


def run_child(script: str | Path, flag: str, spec: dict[str, Any]) -> dict[str, Any]:
    """`python <script> <flag> <spec as JSON>` in a fresh process (a peak-memory run must not share its process
    with other runs); returns the JSON object the child prints on its last line."""
    proc = subprocess.run(
        [sys.executable, str(Path(script).resolve()), flag, json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory run {spec} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"
