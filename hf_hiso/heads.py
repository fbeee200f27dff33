"""A classifier that starts as the zero-shot classifier of a sentence encoder.

`LabelDescriptionClassifier` classifies on the encoder's own pooling (mean pooling for sentence-transformers models,
read from their `1_Pooling/config.json`) with a head initialised from the embeddings of label descriptions:

    e = normalize(pool(encoder(text)))          logits = scale * e @ W.T + b,   W_c = normalize(pool(encoder(d_c)))

so that before training it predicts exactly the cosine zero-shot classifier `argmax_c cos(e, emb(d_c))`, and a
zeroth-order run starts from what the model already knows instead of a random head on a representation it was not
trained to produce (`BENCHMARKS.md`, "Does the default run train a model worth keeping?").

Saved as a stock encoder folder (`AutoModel.from_pretrained` loads it) plus `classifier.safetensors` (`weight`,
`bias`) and `classifier_config.json` (pooling, scale, labels); [`LabelDescriptionClassifier.from_pretrained`] loads
both, and the model card shows the few lines that do the same with transformers alone.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel
from transformers.modeling_outputs import SequenceClassifierOutput

POOLINGS = ("mean", "cls", "max")
HEAD_FILE = "classifier.safetensors"
HEAD_CONFIG = "classifier_config.json"
POOLING_CONFIG = os.path.join("1_Pooling", "config.json")


def read_pooling(model_path: str | os.PathLike[str]) -> str:
    """The pooling a sentence-transformers folder declares (`1_Pooling/config.json`); `"mean"`, with a warning that
    says so, when the folder has none."""
    path = os.path.join(os.fspath(model_path), POOLING_CONFIG)
    if not os.path.isfile(path):
        warnings.warn(
            f"{path} not found: using mean pooling of the last hidden states for the label-description head.",
            stacklevel=2,
        )
        return "mean"
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    for mode in POOLINGS:
        if config.get(f"pooling_mode_{mode}_tokens") or config.get(f"pooling_mode_{mode}_token"):
            return mode
    raise ValueError(f"{path} declares a pooling this head does not implement; supported: {POOLINGS}.")


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Sentence embedding `(B, H)` from token states `(B, T, H)` and the attention mask `(B, T)`."""
    if mode == "cls":
        return hidden[:, 0]
    mask = torch.ones(hidden.shape[:2], device=hidden.device) if mask is None else mask
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def check_descriptions(descriptions: Sequence[str | Sequence[str]], num_labels: int | None) -> list[list[str]]:
    """One non-empty list of non-empty strings per label; a `ValueError` naming `label_descriptions` otherwise."""
    if isinstance(descriptions, str) or not descriptions:
        raise ValueError(f"`label_descriptions` must be a non-empty list (one entry per label), got {descriptions!r}")
    out = []
    for i, entry in enumerate(descriptions):
        texts = [entry] if isinstance(entry, str) else list(entry)
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise ValueError(f"`label_descriptions[{i}]` must be a non-empty text (or list of texts), got {entry!r}")
        out.append(texts)
    if num_labels is not None and len(out) != num_labels:
        raise ValueError(f"`label_descriptions` has {len(out)} entries but the task has {num_labels} labels.")
    return out


class LabelDescriptionClassifier(nn.Module):
    """A sentence encoder with a cosine head initialised from label descriptions (see the module docstring).

    Args:
        encoder: a transformers encoder (`AutoModel`).
        weight: `(num_labels, hidden)` initial head rows (normalised here).
        pooling: `"mean"`, `"cls"` or `"max"`.
        scale: the logit scale applied to cosine similarities (20 gives the zero-shot head confident logits).
        labels: label names, kept in the saved config.
        freeze_encoder: train the head only (the encoder's features of a batch are then computed once per batch,
            not once per forward pass of a zeroth-order step).
    """

    def __init__(
        self,
        encoder: nn.Module,
        weight: torch.Tensor,
        pooling: str = "mean",
        scale: float = 20.0,
        labels: Sequence[str] | None = None,
        freeze_encoder: bool = True,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"`pooling` must be one of {POOLINGS}, got {pooling!r}")
        self.encoder, self.pooling, self.scale = encoder, pooling, float(scale)
        self.labels = list(labels) if labels is not None else [str(i) for i in range(weight.shape[0])]
        self.weight = nn.Parameter(nn.functional.normalize(weight.detach().float(), dim=-1).clone())
        self.bias = nn.Parameter(torch.zeros(weight.shape[0]))
        self.encoder.requires_grad_(not freeze_encoder)
        self.config = encoder.config
        self._cache: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None

    @torch.no_grad()
    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Normalised sentence embeddings `(B, H)`."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return nn.functional.normalize(pool(hidden, attention_mask, self.pooling).float(), dim=-1)

    def _features(self, input_ids, attention_mask, **kwargs) -> torch.Tensor:
        frozen = not any(p.requires_grad for p in self.encoder.parameters())
        if frozen and self._cache is not None:
            ids, mask, feats = self._cache
            if ids.shape == input_ids.shape and torch.equal(ids, input_ids):
                if (mask is None and attention_mask is None) or (
                    mask is not None and attention_mask is not None and torch.equal(mask, attention_mask)
                ):
                    return feats
        feats = self.embed(input_ids, attention_mask, **kwargs)
        if frozen:
            self._cache = (input_ids.clone(), None if attention_mask is None else attention_mask.clone(), feats)
        return feats

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        feats = self._features(input_ids, attention_mask, **extra)
        logits = self.scale * feats @ self.weight.T + self.bias
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)

    @classmethod
    def from_label_descriptions(
        cls,
        model_name_or_path: str,
        tokenizer: Any,
        label_descriptions: Sequence[str | Sequence[str]],
        labels: Sequence[str] | None = None,
        scale: float = 20.0,
        freeze_encoder: bool = True,
        **from_pretrained_kwargs: Any,
    ) -> LabelDescriptionClassifier:
        """Loads the encoder and sets each head row to the normalised mean embedding of its label's descriptions."""
        texts = check_descriptions(label_descriptions, None if labels is None else len(labels))
        pooling = read_pooling(model_name_or_path) if os.path.isdir(model_name_or_path) else "mean"
        encoder = AutoModel.from_pretrained(model_name_or_path, **from_pretrained_kwargs)
        model = cls(
            encoder, torch.zeros(len(texts), encoder.config.hidden_size), pooling, scale, labels, freeze_encoder
        )
        encoder.eval()
        rows = []
        for entry in texts:
            batch = tokenizer(entry, padding=True, truncation=True, return_tensors="pt")
            rows.append(model.embed(**batch).mean(0))
        with torch.no_grad():
            model.weight.copy_(nn.functional.normalize(torch.stack(rows), dim=-1))
        return model

    def save_pretrained(self, folder: str | os.PathLike[str], **kwargs: Any) -> None:
        """A stock encoder folder plus the head (`classifier.safetensors`) and its config."""
        folder = os.fspath(folder)
        self.encoder.save_pretrained(folder, **kwargs)
        save_file({"weight": self.weight.detach().contiguous(), "bias": self.bias.detach()}, f"{folder}/{HEAD_FILE}")
        with open(os.path.join(folder, HEAD_CONFIG), "w", encoding="utf-8") as f:
            json.dump({"pooling": self.pooling, "scale": self.scale, "labels": self.labels}, f, indent=1)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], **kwargs: Any) -> LabelDescriptionClassifier:
        folder = os.fspath(folder)
        with open(os.path.join(folder, HEAD_CONFIG), encoding="utf-8") as f:
            config = json.load(f)
        head = load_file(os.path.join(folder, HEAD_FILE))
        model = cls(AutoModel.from_pretrained(folder, **kwargs), head["weight"], config["pooling"], config["scale"],
                    config["labels"])  # fmt: skip
        with torch.no_grad():
            model.weight.copy_(head["weight"])
            model.bias.copy_(head["bias"])
        return model
