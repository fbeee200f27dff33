"""The label-description head: it is the cosine zero-shot classifier before training, reloads with transformers
alone, and runs through run_glue federated."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_run_glue import load_run_glue, make_tiny_text_model, tiny_argv, tiny_setup  # noqa: F401
from transformers import AutoModel, AutoTokenizer

from hf_hiso.heads import LabelDescriptionClassifier, check_descriptions, pool, read_pooling


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = make_tiny_text_model(tmp_path_factory.mktemp("tiny"))
    os.makedirs(folder / "1_Pooling")
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return folder


def test_untrained_head_is_the_cosine_zero_shot_classifier(tiny_folder):
    tok = AutoTokenizer.from_pretrained(tiny_folder)
    descriptions = [["bad", "bad w1"], "good"]
    model = LabelDescriptionClassifier.from_label_descriptions(str(tiny_folder), tok, descriptions, ["neg", "pos"])
    texts = ["w3 good w4", "bad w5 w6 w7", "w8 w9", "good bad good"]
    batch = tok(texts, return_tensors="pt", padding=True)
    # Independent computation with the stock encoder: mean over real tokens, cosine to the mean label embedding.
    enc = AutoModel.from_pretrained(tiny_folder).eval()

    def mean_embedding(strings):
        b = tok(strings, return_tensors="pt", padding=True)
        with torch.no_grad():
            h = enc(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    labels = torch.stack([mean_embedding(d if isinstance(d, list) else [d]).mean(0) for d in descriptions])
    cosine = mean_embedding(texts) @ torch.nn.functional.normalize(labels, dim=-1).T
    with torch.no_grad():
        logits = model(**batch).logits
    torch.testing.assert_close(logits, 20.0 * cosine, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(-1), cosine.argmax(-1))


def test_save_and_reload_with_transformers_alone(tiny_folder, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_folder)
    model = LabelDescriptionClassifier.from_label_descriptions(str(tiny_folder), tok, ["bad", "good"])
    with torch.no_grad():
        model.bias.copy_(torch.tensor([0.3, -0.2]))
        model.weight.add_(0.01)
    batch = tok(["good w3", "bad w4 w5"], return_tensors="pt", padding=True)
    expected = model(**batch).logits.detach()
    model.save_pretrained(tmp_path)
    again = LabelDescriptionClassifier.from_pretrained(tmp_path)
    assert torch.equal(again(**batch).logits.detach(), expected)
    # What the model card shows: the stock encoder plus the head file.
    encoder, head = AutoModel.from_pretrained(tmp_path).eval(), load_file(tmp_path / "classifier.safetensors")
    with torch.no_grad():
        e = pool(encoder(**batch).last_hidden_state, batch["attention_mask"], "mean")
    logits = 20.0 * torch.nn.functional.normalize(e, dim=-1) @ head["weight"].T + head["bias"]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_bad_descriptions_and_missing_pooling(tmp_path):
    with pytest.raises(ValueError, match="label_descriptions"):
        check_descriptions([], 2)
    with pytest.raises(ValueError, match=r"label_descriptions\[1\]"):
        check_descriptions(["bad", "  "], 2)
    with pytest.raises(ValueError, match="3 entries but the task has 2 labels"):
        check_descriptions(["a", "b", "c"], 2)
    with pytest.warns(UserWarning, match="mean pooling"):
        assert read_pooling(tmp_path) == "mean"


def test_run_glue_label_description_head_end_to_end(tiny_setup, tmp_path):  # noqa: F811 (the fixture)
    run_glue = load_run_glue()
    out = tmp_path / "out"
    trainer, summary = run_glue.run(tiny_argv(tiny_setup, out, "--head", "label_descriptions"))
    assert isinstance(trainer.model, LabelDescriptionClassifier)
    assert summary["trainable_params"] == 2 * trainer.model.weight.shape[1] + 2  # the head only
    reloaded = LabelDescriptionClassifier.from_pretrained(out)
    for a, b in zip((trainer.model.weight, trainer.model.bias), (reloaded.weight, reloaded.bias), strict=True):
        assert torch.equal(a.detach(), b.detach())
    with pytest.raises(ValueError, match="label_descriptions"):
        run_glue.run(tiny_argv(tiny_setup, tmp_path / "bad", "--head", "label_descriptions",
                               "--label_descriptions", "only one"))  # fmt: skip
