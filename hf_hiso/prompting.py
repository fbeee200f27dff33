"""Classification as a causal LM's own problem: a prompt template, label words, and the loss and prediction on them.

A task is phrased as text the model continues (`"Tweet: {text}\\nSentiment:"`) and each class is a *label word* (a
verbalizer, `" negative"` / `" positive"`). Every training sequence is the prompt followed by the gold label word's
tokens; its `labels` are `-100` everywhere except on those tokens, so a causal LM's own loss is the label word's
negative log-likelihood and nothing else. A prediction is the label word with the highest log-probability after the
prompt, summed over its tokens when a word is several tokens long.

Zeroth-order training needs only loss *values*, so the objective may also be a metric that has no gradient:
[`LabelWordObjective`] turns the label-word prediction into `1 - accuracy`, `1 - macro-F1` or smoothed versions of
them, and plugs into `Trainer(compute_loss_func=...)`.

Why a smoothed metric: accuracy of a batch is piecewise constant in the parameters, so with the usual perturbation
radius (`zo_eps=1e-3`) `f(x + mu z) - f(x)` is exactly 0 for almost every direction and ZO learns nothing. Two ways
out, both measured in `tests/test_prompting.py`:

* `metric="soft_error"` / `"soft_f1"`: the metric of *soft* predictions, `sigmoid(margin / temperature)` or
  `softmax(scores / temperature)`; it equals the hard metric as `temperature -> 0` and changes with every
  parameter, so ordinary `zo_eps` works.
* the hard metric with a large radius (`zo_eps` around `1e-1` to `1`): finite differences then estimate the gradient
  of the Gaussian-smoothed metric `E_u[f(x + mu u)]`, which is smooth although `f` is not. This needs big batches
  and many steps, because each difference moves in steps of `1 / batch_size`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "OBJECTIVES",
    "TEXT_SLOT",
    "LabelWordCollator",
    "LabelWordMetrics",
    "LabelWordObjective",
    "PromptTemplate",
    "encode_label_words",
    "evaluate_label_words",
    "gold_classes",
    "label_word_log_probs",
    "label_word_loss",
    "label_word_scores",
    "label_word_scores_from_logits",
    "make_objective",
    "metrics_from_scores",
    "predict_label_words",
    "tokenize_prompts",
]

IGNORE_INDEX = -100
TEXT_SLOT = "{text}"
OBJECTIVES = ("error", "f1", "soft_error", "soft_f1", "class_ce")


# ---- templates and label words -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptTemplate:
    r"""A prompt with one `{text}` slot, and one label word per class.

    Args:
        template (`str`):
            The prompt, e.g. `"Tweet: {text}\nSentiment:"`. Must contain `{text}` exactly once; other braces are
            kept literally (the template is not a `str.format` string).
        label_words (`Sequence[str]`):
            The word that names each class, in class-id order, e.g. `(" negative", " positive")`. Mind the leading
            space: byte-level BPE tokenizers spell a word after a space as one token (`" positive"`), but `"positive"`
            glued to the prompt as another.

    Raises:
        `ValueError`: when the template has no (or several) `{text}` slots, or fewer than two, empty or repeated
            label words.
    """

    template: str
    label_words: tuple[str, ...]

    def __init__(self, template: str, label_words: Sequence[str]):
        count = template.count(TEXT_SLOT)
        if count != 1:
            raise ValueError(
                f"The prompt template must contain the text slot {TEXT_SLOT!r} exactly once (where each example's "
                f"text goes), found it {count} times in {template!r}. Example: 'Tweet: {{text}}\\nSentiment:'."
            )
        words = tuple(label_words) if not isinstance(label_words, str) else (label_words,)
        if len(words) < 2:
            raise ValueError(f"`label_words` needs one word per class (at least 2), got {list(words)!r}.")
        if any(not isinstance(w, str) or not w.strip() for w in words):
            raise ValueError(f"Every label word must be a non-empty string, got {list(words)!r}.")
        if len(set(words)) != len(words):
            raise ValueError(f"The label words must be distinct, got {list(words)!r}.")
        object.__setattr__(self, "template", template)
        object.__setattr__(self, "label_words", words)
        if self.suffix[-1:].isspace() and any(w[:1].isspace() for w in words):
            logger.warning(
                f"The template ends with whitespace ({self.suffix[-3:]!r}) and a label word starts with whitespace: "
                "the model would see two spaces before the label word. Drop one of them."
            )

    @property
    def prefix(self) -> str:
        return self.template.split(TEXT_SLOT)[0]

    @property
    def suffix(self) -> str:
        return self.template.split(TEXT_SLOT)[1]

    def format(self, text: str) -> str:
        """The prompt for `text` (without the label word)."""
        return self.prefix + text + self.suffix


def encode_label_words(tokenizer: Any, label_words: Sequence[str], allow_multi_token: bool = True) -> list[list[int]]:
    """Token ids of each label word, tokenised on its own without special tokens.

    Args:
        tokenizer: a Hugging Face tokenizer.
        label_words (`Sequence[str]`): one word per class.
        allow_multi_token (`bool`, *optional*, defaults to `True`):
            Accept words of several tokens (their log-probabilities are then summed). With `False`, such a word is
            refused; single-token words let one forward pass score every class.

    Returns:
        `list[list[int]]`: the token ids of each word.

    Raises:
        `ValueError`: when a word tokenises to nothing, two words to the same ids, or (with
            `allow_multi_token=False`) a word to several tokens.
    """
    ids = [list(tokenizer(word, add_special_tokens=False)["input_ids"]) for word in label_words]
    for word, word_ids in zip(label_words, ids, strict=True):
        if not word_ids:
            raise ValueError(f"The label word {word!r} tokenises to no tokens.")
        if len(word_ids) > 1 and not allow_multi_token:
            pieces = tokenizer.convert_ids_to_tokens(word_ids)
            raise ValueError(
                f"The label word {word!r} tokenises to {len(word_ids)} tokens {pieces}; this use needs single-token "
                "label words. Pick another word (often the same word with a leading space is one token), or allow "
                "multi-token words, whose log-probabilities are summed."
            )
    if len({tuple(i) for i in ids}) != len(ids):
        raise ValueError(f"Two label words tokenise to the same ids: {dict(zip(label_words, ids, strict=True))}.")
    return ids


# ---- tokenization ------------------------------------------------------------------------------------------------


def _encode_prompt(tokenizer: Any, template: PromptTemplate, text: str, max_prompt_tokens: int) -> list[int]:
    """The prompt's token ids; when too long, tokens are dropped from the end of the *text*, so the template's own
    words (which tell the model what to answer) always survive."""
    prompt = template.format(text)
    enc = tokenizer(prompt, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    excess = len(ids) - max_prompt_tokens
    if excess <= 0:
        return ids
    start, end = len(template.prefix), len(template.prefix) + len(text)
    text_positions = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if start <= a < end and b > a]
    if excess > len(text_positions):
        raise ValueError(
            f"`max_length` is too small: the template and label word alone need {len(ids) - len(text_positions)} "
            f"tokens of the {max_prompt_tokens} allowed to the prompt. Raise `max_length` or shorten the template."
        )
    dropped = set(text_positions[len(text_positions) - excess :])
    return [t for i, t in enumerate(ids) if i not in dropped]


def tokenize_prompts(
    examples: dict[str, list[Any]],
    tokenizer: Any,
    template: PromptTemplate,
    label_word_ids: Sequence[Sequence[int]],
    max_length: int = 64,
    text_column: str = "text",
    label_column: str = "label",
) -> dict[str, list[Any]]:
    """Builds training/evaluation sequences for `Dataset.map(..., batched=True)`.

    Each sequence is `prompt + gold label word`, at most `max_length` tokens (the text is truncated, never the
    template or the label word). `labels` copies the label word's ids at their positions and is `-100` elsewhere, so
    a causal LM's loss (which shifts labels by one position internally) is the label word's negative log-likelihood.

    Args:
        examples: a batch with a text column and an integer class column.
        tokenizer: a fast Hugging Face tokenizer (offsets are used to truncate inside the text only).
        template ([`PromptTemplate`]): the prompt and label words.
        label_word_ids: output of [`encode_label_words`].
        max_length (`int`, *optional*, defaults to 64): the longest sequence, label word included.
        text_column (`str`, *optional*, defaults to `"text"`), label_column (`str`, *optional*, defaults to
            `"label"`): the columns to read.

    Returns:
        `dict`: `input_ids`, `attention_mask`, `labels` (token level) and `label` (the class id, kept for metrics and
        for label-skewed federated partitions; [`LabelWordCollator`] drops it).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("`tokenize_prompts` needs a fast tokenizer (it truncates by character offsets).")
    longest_word = max(len(w) for w in label_word_ids)
    max_prompt = max_length - longest_word
    out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": [], "label": []}
    for text, label in zip(examples[text_column], examples[label_column], strict=True):
        label = int(label)
        if not 0 <= label < len(label_word_ids):
            raise ValueError(f"Class id {label} has no label word (there are {len(label_word_ids)}).")
        prompt = _encode_prompt(tokenizer, template, str(text), max_prompt)
        word = list(label_word_ids[label])
        out["input_ids"].append(prompt + word)
        out["attention_mask"].append([1] * (len(prompt) + len(word)))
        out["labels"].append([IGNORE_INDEX] * len(prompt) + word)
        out["label"].append(label)
    return out


class LabelWordCollator:
    """Pads `input_ids` (with the pad id), `attention_mask` (0) and `labels` (-100) on the right, and drops the other
    columns (`label`, `text`, ...), which a causal LM's `forward` would not accept.

    Args:
        tokenizer (*optional*): supplies `pad_token_id` (or `eos_token_id` when the tokenizer has no pad token).
        pad_token_id (`int`, *optional*): the pad id, overriding the tokenizer's.
        pad_to_multiple_of (`int`, *optional*): round the padded length up to a multiple of this.
    """

    def __init__(self, tokenizer: Any = None, pad_token_id: int | None = None, pad_to_multiple_of: int | None = None):
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_token_id is None:
            raise ValueError("LabelWordCollator needs a `pad_token_id` (or a tokenizer with a pad or eos token).")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            ids = list(f["input_ids"])
            pad = length - len(ids)
            mask = list(f.get("attention_mask", [1] * len(ids)))
            batch["input_ids"].append(ids + [self.pad_token_id] * pad)
            batch["attention_mask"].append(mask + [0] * pad)
            if "labels" in f:
                batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
        if not batch["labels"]:
            del batch["labels"]
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


# ---- loss and scores ---------------------------------------------------------------------------------------------


def _logits_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, tuple):  # return_dict=False; no labels reach the model, so the logits come first
        return outputs[0]
    return outputs["logits"] if isinstance(outputs, dict) else outputs.logits


def label_word_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence summed log-probability of the labelled tokens, `sum_t log p(labels_t | tokens_<t)`.

    Args:
        logits (`torch.Tensor` of shape `(batch, seq, vocab)`): the causal LM's logits.
        labels (`torch.Tensor` of shape `(batch, seq)`): token ids at the label-word positions, `-100` elsewhere
            (aligned with `input_ids`; the shift by one position happens here).

    Returns:
        `torch.Tensor` of shape `(batch,)`, in float32.
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    token_lp = torch.gather(logits.log_softmax(-1), -1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (token_lp * mask).sum(-1)


def label_word_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """The label words' negative log-likelihood per labelled token: `-sum(log p) / (number of labelled tokens)`.

    The same value as a Hugging Face causal LM's own loss when `labels` carries only the label words (as
    [`tokenize_prompts`] builds it); usable as `compute_loss_func`. With gradient accumulation the Trainer passes the
    whole step's token count as `num_items_in_batch`, which then divides instead.
    """
    logits = _logits_of(outputs)
    total = -label_word_log_probs(logits, labels).sum()
    count = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != IGNORE_INDEX).sum()
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count


def _label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Index of the first labelled token of each row (the label word's start)."""
    labelled = labels != IGNORE_INDEX
    if not bool(labelled.any(-1).all()):
        raise ValueError("Every sequence needs a label word (labels != -100 somewhere) to be scored.")
    return labelled.int().argmax(-1)


def label_word_scores_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, label_word_ids: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Log-probability of every (single-token) label word at the position where the gold label word starts, from the
    logits of one forward pass over `prompt + gold word`.

    Args:
        logits (`torch.Tensor` of shape `(batch, seq, vocab)`).
        labels (`torch.Tensor` of shape `(batch, seq)`): as built by [`tokenize_prompts`].
        label_word_ids: one token id list per class; each must be a single token.

    Returns:
        `torch.Tensor` of shape `(batch, num_classes)`.

    Raises:
        `ValueError`: for multi-token label words: their later tokens would be conditioned on the gold word's tokens,
            so their scores cannot come from this pass (use [`label_word_scores`], which runs one pass per class).
    """
    if any(len(w) != 1 for w in label_word_ids):
        raise ValueError(
            "Scoring every class from the logits of one forward pass needs single-token label words; with multi-token "
            "words use `label_word_scores(model, ...)` (one pass per class) instead."
        )
    start = _label_positions(labels)
    rows = torch.arange(labels.shape[0], device=logits.device)
    last_prompt_logits = logits[rows, (start - 1).to(logits.device)].float()
    candidates = torch.tensor([w[0] for w in label_word_ids], device=logits.device)
    return last_prompt_logits.log_softmax(-1)[:, candidates]


@torch.no_grad()
def label_word_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    label_word_ids: Sequence[Sequence[int]],
    pad_token_id: int = 0,
) -> torch.Tensor:
    """Summed log-probability of each class's label word after each sequence's prompt.

    Single-token label words need one forward pass (all classes are read from the same next-token distribution).
    Otherwise each prompt is repeated once per class with that class's word appended, and the word's token
    log-probabilities are summed.

    Args:
        model: a causal LM.
        input_ids, attention_mask, labels (`torch.Tensor` of shape `(batch, seq)`): a batch of
            [`LabelWordCollator`]; the prompt is everything before the first labelled token.
        label_word_ids: one token id list per class.
        pad_token_id (`int`, *optional*, defaults to 0): fills the candidate sequences (masked out).

    Returns:
        `torch.Tensor` of shape `(batch, num_classes)`, float32.
    """
    if all(len(w) == 1 for w in label_word_ids):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return label_word_scores_from_logits(logits, labels, label_word_ids)
    start = _label_positions(labels).tolist()
    rows, row_labels = [], []
    for i, s in enumerate(start):
        prompt = input_ids[i, :s].tolist()
        for word in label_word_ids:
            rows.append(prompt + list(word))
            row_labels.append([IGNORE_INDEX] * len(prompt) + list(word))
    length = max(len(r) for r in rows)
    device = input_ids.device
    ids = torch.tensor([r + [pad_token_id] * (length - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], device=device)
    lab = torch.tensor([r + [IGNORE_INDEX] * (length - len(r)) for r in row_labels], device=device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    return label_word_log_probs(logits, lab).view(len(start), len(label_word_ids))


def gold_classes(labels: torch.Tensor, label_word_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """The class of each sequence, read back from its labelled tokens (`-1` if they match no label word)."""
    out = torch.full((labels.shape[0],), -1, dtype=torch.long)
    words = [list(w) for w in label_word_ids]
    for i, row in enumerate(labels.tolist()):
        tokens = [t for t in row if t != IGNORE_INDEX]
        if tokens in words:
            out[i] = words.index(tokens)
    return out


def metrics_from_scores(scores: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    """Accuracy, macro-F1 and the majority-class rate of argmax predictions of `scores` `(n, classes)`."""
    preds = scores.argmax(-1).cpu()
    gold = gold.cpu()
    num_classes = scores.shape[-1]
    f1s = []
    for c in range(num_classes):
        tp = ((preds == c) & (gold == c)).sum().item()
        fp = ((preds == c) & (gold != c)).sum().item()
        fn = ((preds != c) & (gold == c)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    counts = torch.bincount(gold.clamp_min(0), minlength=num_classes)
    return {
        "accuracy": (preds == gold).float().mean().item(),
        "macro_f1": sum(f1s) / num_classes,
        "majority_rate": counts.max().item() / max(len(gold), 1),
        "predicted_rate_per_class": (torch.bincount(preds, minlength=num_classes) / max(len(preds), 1)).tolist(),
    }


@torch.no_grad()
def predict_label_words(
    model: torch.nn.Module,
    dataset: Iterable[dict[str, Any]],
    collator: LabelWordCollator,
    label_word_ids: Sequence[Sequence[int]],
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores every example of a tokenised dataset (from [`tokenize_prompts`]) in eval mode.

    Returns:
        `(scores, gold)`: `(n, num_classes)` summed label-word log-probabilities and the gold classes `(n,)`.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    examples = list(dataset)
    scores, gold = [], []
    try:
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collator(examples[start : start + batch_size]).items()}
            batch_scores = label_word_scores(
                model, **batch, label_word_ids=label_word_ids, pad_token_id=collator.pad_token_id
            )
            scores.append(batch_scores.cpu())
            gold.append(gold_classes(batch["labels"].cpu(), label_word_ids))
    finally:
        model.train(was_training)
    return torch.cat(scores), torch.cat(gold)


def evaluate_label_words(
    model: torch.nn.Module,
    dataset: Iterable[dict[str, Any]],
    collator: LabelWordCollator,
    label_word_ids: Sequence[Sequence[int]],
    batch_size: int = 32,
) -> dict[str, float]:
    """[`predict_label_words`] followed by [`metrics_from_scores`]: accuracy, macro-F1, majority rate."""
    scores, gold = predict_label_words(model, dataset, collator, label_word_ids, batch_size)
    return metrics_from_scores(scores, gold)


class LabelWordMetrics:
    """`Trainer` hooks that evaluate label-word accuracy inside `trainer.evaluate()` (single-token label words).

    Pass `compute_metrics=metrics` and `preprocess_logits_for_metrics=metrics.preprocess_logits_for_metrics`: the
    logits are reduced to `(batch, num_classes)` scores at once, so the full `(n, seq, vocab)` logits are never
    gathered.
    """

    def __init__(self, label_word_ids: Sequence[Sequence[int]]):
        if any(len(w) != 1 for w in label_word_ids):
            raise ValueError(
                "LabelWordMetrics needs single-token label words; with multi-token words evaluate with "
                "`evaluate_label_words` (one forward pass per class)."
            )
        self.label_word_ids = [list(w) for w in label_word_ids]

    def preprocess_logits_for_metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, tuple):
            logits = logits[0]
        return label_word_scores_from_logits(logits, labels, self.label_word_ids)

    def __call__(self, eval_pred: Any) -> dict[str, float]:
        scores = torch.as_tensor(eval_pred.predictions)
        gold = gold_classes(torch.as_tensor(eval_pred.label_ids), self.label_word_ids)
        out = metrics_from_scores(scores, gold)
        return {k: v for k, v in out.items() if not isinstance(v, list)}


# ---- non-differentiable objectives -------------------------------------------------------------------------------


class LabelWordObjective:
    r"""A metric of the label-word prediction as the training objective, for `Trainer(compute_loss_func=...)`.

    Zeroth-order training reads only loss values, so the objective needs no gradient. With per-example class scores
    `s` (label-word log-probabilities) and the gold class `y`:

    * `"error"`: `1 - accuracy`, the fraction of argmax predictions that are wrong;
    * `"f1"`: `1 - macro-F1` of the argmax predictions over the batch (non-decomposable);
    * `"soft_error"`: `1 - mean_i sigmoid(m_i / T)` with the margin `m_i = s_{i,y} - max_{c != y} s_{i,c}`;
      it tends to `"error"` as `T -> 0`;
    * `"soft_f1"`: `1 - macro-F1` computed from soft predictions `softmax(s / T)` (soft counts of true and false
      positives); it tends to `"f1"` as `T -> 0`;
    * `"class_ce"`: the cross-entropy of `softmax(s / T)` over the label words only (differentiable; unlike the
      label-word loss, which spreads over the whole vocabulary, it rewards only telling the classes apart).

    The hard metrics are piecewise constant: with a small `zo_eps` nearly every finite difference is exactly 0. Use a
    soft metric with the usual `zo_eps`, or a hard one with a large `zo_eps` (see the module docstring).

    Args:
        label_word_ids: one single-token id list per class (the scores come from one forward pass).
        metric (`str`, *optional*, defaults to `"soft_error"`): one of [`OBJECTIVES`].
        temperature (`float`, *optional*, defaults to 1.0): `T` of the soft metrics, in log-probability units.

    Example:

    ```python
    >>> objective = LabelWordObjective(encode_label_words(tok, [" negative", " positive"]), metric="soft_error")
    >>> trainer = HiSoTrainer(model=model, args=args, train_dataset=train, compute_loss_func=objective)
    ```
    """

    def __init__(self, label_word_ids: Sequence[Sequence[int]], metric: str = "soft_error", temperature: float = 1.0):
        if metric not in OBJECTIVES:
            raise ValueError(f"`metric` must be one of {OBJECTIVES}, got {metric!r}")
        if not temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature!r}")
        if any(len(w) != 1 for w in label_word_ids):
            raise ValueError(
                "LabelWordObjective needs single-token label words: the class scores are read from the forward pass "
                "over the gold word, which conditions later tokens on the gold word. Choose single-token words "
                "(`encode_label_words(..., allow_multi_token=False)` checks) or train with the label-word loss."
            )
        self.label_word_ids = [list(w) for w in label_word_ids]
        self.metric = metric
        self.temperature = float(temperature)

    def value(self, scores: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        """The objective from class scores `(batch, classes)` and gold classes `(batch,)`."""
        num_classes = scores.shape[-1]
        if self.metric == "class_ce":
            return F.cross_entropy(scores / self.temperature, gold)
        if self.metric in ("error", "soft_error"):
            gold_score = scores.gather(-1, gold.unsqueeze(-1)).squeeze(-1)
            others = scores.masked_fill(F.one_hot(gold, num_classes).bool(), float("-inf"))
            margin = gold_score - others.max(-1).values
            if self.metric == "error":
                return 1.0 - (margin > 0).float().mean()
            return 1.0 - torch.sigmoid(margin / self.temperature).mean()
        if self.metric == "f1":
            probs = F.one_hot(scores.argmax(-1), num_classes).float()
        else:
            probs = torch.softmax(scores / self.temperature, -1)
        truth = F.one_hot(gold, num_classes).float()
        tp = (probs * truth).sum(0)
        fp = (probs * (1 - truth)).sum(0)
        fn = ((1 - probs) * truth).sum(0)
        denom = 2 * tp + fp + fn
        f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1e-12), torch.zeros_like(denom))
        return 1.0 - f1.mean()

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        logits = _logits_of(outputs)
        scores = label_word_scores_from_logits(logits, labels, self.label_word_ids)
        gold = gold_classes(labels, self.label_word_ids).to(scores.device)
        if bool((gold < 0).any()):
            raise ValueError("Some labelled tokens match no label word; were the sequences built with these words?")
        return self.value(scores, gold)


def make_objective(
    label_word_ids: Sequence[Sequence[int]], objective: str = "label_word_loss", temperature: float = 1.0
) -> Callable[..., torch.Tensor] | None:
    """`compute_loss_func` for an objective name: `"label_word_loss"` (returns `None`: the model's own loss is
    already the label-word loss) or one of [`OBJECTIVES`]."""
    if objective in ("label_word_loss", "ce"):
        return None
    return LabelWordObjective(label_word_ids, metric=objective, temperature=temperature)
