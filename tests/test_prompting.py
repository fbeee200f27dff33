"""Prompt templates, label-word loss and prediction, and non-differentiable objectives on a tiny causal LM."""

import random

import pytest
import torch
from datasets import Dataset
from sklearn.metrics import f1_score
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_hiso import HiSoConfig, HiSoTrainer
from hf_hiso.prompting import (
    IGNORE_INDEX,
    LabelWordCollator,
    LabelWordMetrics,
    LabelWordObjective,
    PromptTemplate,
    encode_label_words,
    evaluate_label_words,
    gold_classes,
    label_word_loss,
    label_word_scores,
    label_word_scores_from_logits,
    make_objective,
    tokenize_prompts,
)

WORDS = ["Review", "Sentiment", "very", "positive", "negative", "good", "bad"] + [f"w{i}" for i in range(20)]
SPECIALS = ["[PAD]", "[UNK]", "<s>", "</s>"]
TEMPLATE = "Review: {text} . Sentiment:"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory (one token per word or punctuation mark): no download."""
    vocab = {t: i for i, t in enumerate(SPECIALS + [":", ".", "!", "?"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )


def tiny_llama(seed: int = 0, vocab_size: int = 40) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def toy_texts(n: int, seed: int = 0) -> Dataset:
    """Random filler words and one of "good" / "bad" at a random place; the class is which of the two appears."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = [f"w{rng.randrange(20)}" for _ in range(rng.randint(1, 4))]
        words.insert(rng.randint(0, len(words)), "good" if label else "bad")
        texts.append(" ".join(words))
        labels.append(label)
    return Dataset.from_dict({"text": texts, "label": labels})


def prepared(n: int, seed: int, label_words=(" negative", " positive"), max_length: int = 16):
    tok = tiny_tokenizer()
    template = PromptTemplate(TEMPLATE, label_words)
    ids = encode_label_words(tok, template.label_words)
    kwargs = {"tokenizer": tok, "template": template, "label_word_ids": ids, "max_length": max_length}
    data = toy_texts(n, seed).map(tokenize_prompts, batched=True, fn_kwargs=kwargs, remove_columns=["text"])
    return tok, ids, data


# ---- templates and label words -----------------------------------------------------------------------------------


def test_template_without_text_slot_is_refused():
    with pytest.raises(ValueError, match=r"text slot '\{text\}' exactly once"):
        PromptTemplate("Review: . Sentiment:", [" negative", " positive"])
    with pytest.raises(ValueError, match="exactly once"):
        PromptTemplate("{text} {text}", [" negative", " positive"])
    with pytest.raises(ValueError, match="at least 2"):
        PromptTemplate(TEMPLATE, [" positive"])
    with pytest.raises(ValueError, match="distinct"):
        PromptTemplate(TEMPLATE, [" positive", " positive"])
    # Other braces are literal text, not format fields.
    assert PromptTemplate("{x} {text}:", ["a", "b"]).format("hi") == "{x} hi:"


def test_multi_token_label_words_are_encoded_or_refused_clearly():
    tok = tiny_tokenizer()
    ids = encode_label_words(tok, [" negative", " very positive"])
    assert [len(w) for w in ids] == [1, 2]
    with pytest.raises(ValueError, match="tokenises to 2 tokens"):
        encode_label_words(tok, [" negative", " very positive"], allow_multi_token=False)
    with pytest.raises(ValueError, match="single-token"):
        LabelWordObjective(ids)
    with pytest.raises(ValueError, match="single-token"):
        LabelWordMetrics(ids)


# ---- sequences and the loss ----------------------------------------------------------------------------------------


def test_labels_cover_exactly_the_label_word_and_truncation_keeps_the_template():
    tok = tiny_tokenizer()
    template = PromptTemplate(TEMPLATE, [" negative", " very positive"])
    ids = encode_label_words(tok, template.label_words)
    long_text = " ".join(f"w{i}" for i in range(20))
    batch = {"text": ["good w1", long_text], "label": [1, 0]}
    out = tokenize_prompts(batch, tok, template, ids, max_length=12)
    suffix = tok(template.suffix, add_special_tokens=False)["input_ids"]
    for seq, labels, cls in zip(out["input_ids"], out["labels"], out["label"], strict=True):
        word = ids[cls]
        labelled = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
        assert labelled == list(range(len(seq) - len(word), len(seq)))
        assert [labels[i] for i in labelled] == word == seq[-len(word) :]
        prompt = seq[: len(seq) - len(word)]
        assert prompt[-len(suffix) :] == suffix  # the template's end survives truncation
        assert len(seq) <= 12
    # The long text was cut so that the longest label word would fit too: 12 - 2 prompt tokens at most.
    assert len(out["input_ids"][1]) == 12 - 2 + len(ids[0])
    with pytest.raises(ValueError, match="`max_length` is too small"):
        tokenize_prompts(batch, tok, template, ids, max_length=4)


def test_label_word_loss_targets_only_label_positions_and_matches_the_model_loss():
    tok, ids, data = prepared(6, seed=0, label_words=(" negative", " very positive"))
    batch = LabelWordCollator(tok)([data[i] for i in range(6)])
    model = tiny_llama().eval()
    with torch.no_grad():
        out = model(**batch)
    loss = label_word_loss(out, batch["labels"])
    torch.testing.assert_close(loss, out.loss)
    # By hand: log p(token at t | prefix) is read from the logits at t - 1, only where labels are set.
    logp = out.logits.log_softmax(-1)
    terms = [
        logp[b, t - 1, batch["labels"][b, t]]
        for b in range(6)
        for t in range(batch["labels"].shape[1])
        if batch["labels"][b, t] != IGNORE_INDEX
    ]
    torch.testing.assert_close(loss, -torch.stack(terms).mean())
    # Changing the logits anywhere but at the positions that predict a label token leaves the loss unchanged.
    predicting = torch.zeros_like(batch["labels"], dtype=torch.bool)
    predicting[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
    noisy = out.logits + torch.randn_like(out.logits) * (~predicting).unsqueeze(-1)
    torch.testing.assert_close(label_word_loss(noisy, batch["labels"]), loss)
    assert not torch.allclose(label_word_loss(out.logits + torch.randn_like(out.logits), batch["labels"]), loss)


def test_collator_pads_right_and_drops_other_columns():
    tok, _, data = prepared(4, seed=1)
    features = [dict(data[i], text="dropped") for i in range(4)]
    batch = LabelWordCollator(tok)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    lengths = [len(f["input_ids"]) for f in features]
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].sum() == n
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()


# ---- prediction ----------------------------------------------------------------------------------------------------


def _unpadded_prompt_log_probs(model, prompt: list[int], word: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + word])).logits[0]
    logp = logits.log_softmax(-1)
    return sum(logp[len(prompt) - 1 + k, t] for k, t in enumerate(word))


@pytest.mark.parametrize("label_words", [(" negative", " positive"), (" negative", " very positive")])
def test_scores_are_summed_label_word_log_probs_and_prediction_is_their_argmax(label_words):
    tok, ids, data = prepared(8, seed=2, label_words=label_words)
    collator = LabelWordCollator(tok)
    batch = collator([data[i] for i in range(8)])  # padded: rows have different lengths
    model = tiny_llama(seed=3).eval()
    scores = label_word_scores(model, **batch, label_word_ids=ids, pad_token_id=tok.pad_token_id)
    assert scores.shape == (8, 2)
    for i in range(8):
        start = int((batch["labels"][i] != IGNORE_INDEX).int().argmax())
        prompt = batch["input_ids"][i, :start].tolist()
        expected = torch.stack([_unpadded_prompt_log_probs(model, prompt, w) for w in ids])
        torch.testing.assert_close(scores[i], expected, rtol=1e-4, atol=1e-5)
    metrics = evaluate_label_words(model, data.select(range(8)), collator, ids, batch_size=3)
    gold = gold_classes(batch["labels"], ids)
    assert gold.tolist() == data["label"][:8]
    assert metrics["accuracy"] == pytest.approx((scores.argmax(-1) == gold).float().mean().item())


def test_metrics_hooks_inside_trainer_evaluate_agree_with_evaluate_label_words(tmp_path):
    tok, ids, data = prepared(24, seed=4)
    model = tiny_llama(seed=5)
    collator = LabelWordCollator(tok)
    hooks = LabelWordMetrics(ids)
    args = HiSoConfig(output_dir=str(tmp_path), per_device_eval_batch_size=5, report_to="none", use_cpu=True)
    trainer = HiSoTrainer(
        model=model,
        args=args,
        eval_dataset=data,
        data_collator=collator,
        compute_metrics=hooks,
        preprocess_logits_for_metrics=hooks.preprocess_logits_for_metrics,
    )
    out = trainer.evaluate()
    direct = evaluate_label_words(model, data, collator, ids, batch_size=7)
    assert out["eval_accuracy"] == pytest.approx(direct["accuracy"])
    assert out["eval_macro_f1"] == pytest.approx(direct["macro_f1"])


# ---- non-differentiable objectives ---------------------------------------------------------------------------------


def test_objective_values_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(40, 3, generator=g)
    gold = torch.randint(0, 3, (40,), generator=g)
    ids = [[5], [6], [7]]
    preds = scores.argmax(-1)
    error = LabelWordObjective(ids, "error").value(scores, gold)
    torch.testing.assert_close(error, 1 - (preds == gold).float().mean())
    f1 = LabelWordObjective(ids, "f1").value(scores, gold)
    assert f1.item() == pytest.approx(1 - f1_score(gold, preds, average="macro"), abs=1e-6)
    # The soft metrics tend to the hard ones as the temperature goes to 0, and are strictly between at T = 1.
    cold = {m: LabelWordObjective(ids, f"soft_{m}", temperature=1e-4).value(scores, gold) for m in ("error", "f1")}
    torch.testing.assert_close(cold["error"], error, atol=1e-3, rtol=0)
    torch.testing.assert_close(cold["f1"], f1, atol=1e-3, rtol=0)
    warm = LabelWordObjective(ids, "soft_error").value(scores, gold)
    assert 0 < warm < 1 and warm != error
    ce = LabelWordObjective(ids, "class_ce").value(scores, gold)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(scores, gold))
    assert make_objective(ids, "label_word_loss") is None


def _train_objective(tmp_path, metric: str, zo_eps: float, steps: int, lr: float = 0.1):
    tok, ids, train = prepared(256, seed=0)
    _, _, held_out = prepared(256, seed=1)
    collator = LabelWordCollator(tok)
    model = tiny_llama()
    objective = LabelWordObjective(ids, metric=metric)
    error = LabelWordObjective(ids, metric="error")
    held_batch = collator(list(held_out))

    def held_out_error() -> float:
        with torch.no_grad():
            return error(
                model(input_ids=held_batch["input_ids"], attention_mask=held_batch["attention_mask"]),
                held_batch["labels"],
            ).item()

    before = held_out_error()
    args = HiSoConfig(
        output_dir=str(tmp_path / metric),
        per_device_train_batch_size=32,
        learning_rate=lr,
        max_steps=steps,
        zo_eps=zo_eps,
        zo_num_directions=4,
        zo_preconditioner=False,
        # The thresholds below were set on this generator's trajectory (one seed, 80 steps): pinned so that they
        # keep testing the objectives, not the luck of other directions.
        zo_generator="cpu",
        logging_steps=steps,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = HiSoTrainer(
        model=model, args=args, train_dataset=train, data_collator=collator, compute_loss_func=objective
    )
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    return before, held_out_error(), log["zo/scalar_abs_mean"]


def test_hard_error_with_a_small_radius_gives_zero_scalars(tmp_path):
    # Accuracy is piecewise constant: a 1e-3 perturbation flips no prediction, so every finite difference is 0.
    before, after, scalar_abs = _train_objective(tmp_path, "error", zo_eps=1e-3, steps=10)
    assert scalar_abs == 0.0
    assert after == before


@pytest.mark.parametrize(("metric", "zo_eps"), [("soft_error", 1e-3), ("error", 0.1), ("soft_f1", 1e-3)])
def test_non_differentiable_objective_trains_on_a_toy_task(tmp_path, metric, zo_eps):
    # The fixes: a smoothed metric at the usual radius, or the hard metric with a radius large enough to flip
    # predictions (finite differences of the Gaussian-smoothed metric).
    before, after, scalar_abs = _train_objective(tmp_path, metric, zo_eps=zo_eps, steps=80)
    assert scalar_abs > 0
    assert before > 0.3  # the random model is near chance on balanced classes
    assert after < before - 0.25, (before, after)


def test_label_word_scores_from_logits_reads_the_position_before_the_label():
    labels = torch.tensor(
        [[IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX], [IGNORE_INDEX, 8, IGNORE_INDEX, IGNORE_INDEX]]
    )
    logits = torch.zeros(2, 4, 10)
    logits[0, 1, 8] = 5.0  # row 0: position 1 predicts the label at position 2; favours class 1 (token 8)
    logits[1, 0, 7] = 5.0  # row 1: position 0 predicts position 1; favours class 0 (token 7)
    logits[0, 2, 7] = 50.0  # after the label: must be ignored
    scores = label_word_scores_from_logits(logits, labels, [[7], [8]])
    assert scores.argmax(-1).tolist() == [1, 0]
