"""Splitting one `datasets.Dataset` into the local datasets of `M` simulated clients.

Three strategies, all deterministic given `seed` and drawn from a private `numpy.random.Generator` (the global RNGs
drive dropout and data order, so they are never touched):

* `"iid"`: a seeded permutation of all indices cut into `M` near-equal shards (sizes differ by at most one).
* `"dirichlet"`: label skew as in the federated-learning literature (Hsu et al., 2019) and the HiSo paper
  (`alpha = 1`). For every class `k` with index set `I_k`, client proportions are drawn
  `q_k ~ Dirichlet(alpha * 1_M)` and the shuffled `I_k` is cut at `floor(n_k * cumsum(q_k))`, so client `j` receives
  about `q_{k,j} * n_k` examples of class `k`. Small `alpha` gives each class to few clients; large `alpha`
  approaches the IID split.
* `"column"`: a natural partition, where the value in `client_column` names the client (for example a user or
  speaker id). The distinct values, in sorted order, become clients `0..M-1`.

Every example lands in exactly one client; each client's indices are returned in ascending order (data order
inside a client is the Trainer's sampler's business, and sorted indices make `Dataset.select` contiguous).

Rebalancing rule for `"dirichlet"` (so that no client is left with fewer than `min_examples_per_client` examples):

1. Draw the proportions of all classes together, up to `DIRICHLET_MAX_DRAWS` times, and keep the first draw in which
   every client has at least `min_examples_per_client` examples.
2. If no draw qualifies, keep the draw whose smallest client is largest (the earliest such draw on ties) and, for
   each deficient client in index order, move one uniformly chosen example at a time from the currently largest
   client (lowest index on ties) until it reaches the minimum. While any client is below the minimum, the largest
   one holds at least `min_examples_per_client + 1` examples, so a donor never falls below the minimum itself.

A split is impossible when `num_examples < num_clients * min_examples_per_client`; that raises a `ValueError`.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np
from datasets import ClassLabel, Dataset, Value

STRATEGIES = ("iid", "dirichlet", "column")

# Draws of the Dirichlet proportions before falling back to moving examples. A draw is cheap (O(classes * clients)),
# and with the common settings (alpha >= 0.1, a few hundred examples per client) the first draw nearly always fits.
DIRICHLET_MAX_DRAWS = 100

_INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool")

__all__ = [
    "DIRICHLET_MAX_DRAWS",
    "STRATEGIES",
    "label_distribution",
    "partition_dataset",
    "partition_indices",
]


def _is_int(value: object) -> bool:
    # bool is an int subclass; a flag passed as a count is a bug, not a count.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _validate_common(
    num_clients: int, strategy: str, dirichlet_alpha: float, seed: int, min_examples_per_client: int
) -> None:
    if not _is_int(num_clients) or num_clients < 1:
        raise ValueError(f"`num_clients` must be an integer >= 1, got {num_clients!r}.")
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {', '.join(map(repr, STRATEGIES))}, got {strategy!r}.")
    if (
        isinstance(dirichlet_alpha, bool)
        or not isinstance(dirichlet_alpha, numbers.Real)
        or not math.isfinite(dirichlet_alpha)
        or dirichlet_alpha <= 0
    ):
        raise ValueError(f"`dirichlet_alpha` must be a finite number > 0, got {dirichlet_alpha!r}.")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")
    if not _is_int(min_examples_per_client) or min_examples_per_client < 0:
        raise ValueError(f"`min_examples_per_client` must be an integer >= 0, got {min_examples_per_client!r}.")


def _check_enough_examples(num_examples: int, num_clients: int, min_examples_per_client: int) -> None:
    if num_examples < num_clients * min_examples_per_client:
        raise ValueError(
            f"Cannot give each of `num_clients`={num_clients} clients at least `min_examples_per_client`="
            f"{min_examples_per_client} examples: the dataset has only {num_examples} examples (needs at least "
            f"{num_clients * min_examples_per_client})."
        )


def _as_int_labels(labels: Sequence[int] | np.ndarray, num_examples: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(
            f"`labels` must be one integer class id per example (1-D), got an array of shape {arr.shape}."
        )
    if len(arr) != num_examples:
        raise ValueError(f"`labels` has {len(arr)} entries but `num_examples` is {num_examples}.")
    if arr.dtype.kind == "O" and all(isinstance(v, numbers.Integral) for v in arr.tolist()):
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iub":
        raise ValueError(
            f"`labels` must be integers (or a `ClassLabel` column) for strategy='dirichlet', got dtype {arr.dtype}. "
            "Encode string labels with `dataset.class_encode_column(...)`; continuous targets cannot be skewed by "
            "class."
        )
    return arr.astype(np.int64, copy=False)


def _split_counts(proportions: np.ndarray, class_sizes: np.ndarray) -> np.ndarray:
    """Examples of each class per client, `(num_classes, num_clients)`: cut points `floor(n_k * cumsum(q_k))`."""
    cuts = np.floor(np.cumsum(proportions, axis=1) * class_sizes[:, None]).astype(np.int64)
    # The cumulative sum can end a hair below 1 in floating point; the last cut must be n_k so nothing is lost.
    cuts[:, -1] = class_sizes
    cuts = np.maximum.accumulate(cuts, axis=1)
    return np.diff(cuts, axis=1, prepend=0)


def _dirichlet_split(
    labels: np.ndarray, num_clients: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[list[int]]:
    classes = np.unique(labels)
    # One shuffle per class, reused by every draw: only the proportions are redrawn.
    class_indices = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    class_sizes = np.array([len(ix) for ix in class_indices], dtype=np.int64)

    best_counts: np.ndarray | None = None
    best_min = -1
    for _ in range(DIRICHLET_MAX_DRAWS):
        proportions = rng.dirichlet(np.full(num_clients, alpha), size=len(classes))
        counts = _split_counts(proportions, class_sizes)
        smallest = int(counts.sum(axis=0).min())
        if smallest > best_min:
            best_counts, best_min = counts, smallest
        if smallest >= min_size:
            break
    assert best_counts is not None

    clients: list[list[int]] = [[] for _ in range(num_clients)]
    for ix, counts_k in zip(class_indices, best_counts, strict=True):
        start = 0
        for j, c in enumerate(counts_k.tolist()):
            clients[j].extend(ix[start : start + c].tolist())
            start += c

    # Fallback: top deficient clients up from the largest client, one random example at a time.
    for j in range(num_clients):
        while len(clients[j]) < min_size:
            sizes = [len(c) for c in clients]
            donor = clients[int(np.argmax(sizes))]
            pick = int(rng.integers(len(donor)))
            # Swap-remove keeps the move O(1); the donor's order does not matter since shards are sorted at the end.
            donor[pick], donor[-1] = donor[-1], donor[pick]
            clients[j].append(donor.pop())
    return clients


def _column_split(client_ids: Sequence[Hashable], num_clients: int, min_size: int) -> list[list[int]]:
    ids = list(client_ids)
    if any(v is None for v in ids):
        raise ValueError("`client_column` contains missing values (None); every example must name its client.")
    try:
        distinct = sorted(set(ids))
    except TypeError as err:
        raise ValueError(f"`client_column` values must be hashable and mutually sortable, got: {err}") from err
    if len(distinct) != num_clients:
        shown = ", ".join(map(repr, distinct[:10])) + (", ..." if len(distinct) > 10 else "")
        raise ValueError(
            f"`client_column` has {len(distinct)} distinct values ({shown}) but `num_clients` is {num_clients}; "
            "with strategy='column' they must be equal."
        )
    position = {v: j for j, v in enumerate(distinct)}
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    for i, v in enumerate(ids):
        clients[position[v]].append(i)
    for j, c in enumerate(clients):
        if len(c) < min_size:
            raise ValueError(
                f"Client {j} (`client_column` value {distinct[j]!r}) has {len(c)} examples, fewer than "
                f"`min_examples_per_client`={min_size}; a natural partition is not rebalanced."
            )
    return clients


def partition_indices(
    num_examples: int,
    num_clients: int,
    strategy: str = "iid",
    *,
    labels: Sequence[int] | np.ndarray | None = None,
    client_ids: Sequence[Hashable] | None = None,
    dirichlet_alpha: float = 1.0,
    seed: int = 0,
    min_examples_per_client: int = 1,
) -> list[list[int]]:
    """Assigns each of `num_examples` examples to exactly one of `num_clients` clients.

    Args:
        num_examples: number of examples `n`; indices are `0..n-1`.
        num_clients: number of clients `M` (>= 1).
        strategy: `"iid"`, `"dirichlet"` (label skew, `q_k ~ Dirichlet(alpha * 1_M)` per class `k`) or `"column"`
            (natural partition by `client_ids`). See the module docstring.
        labels: integer class id per example; required for `"dirichlet"`.
        client_ids: client key per example (any sortable value); required for `"column"`, where its distinct values,
            sorted, become clients `0..M-1`.
        dirichlet_alpha: concentration `alpha` (finite, > 0); smaller is more skewed. The HiSo paper uses 1.
        seed: seed of the private `numpy.random.Generator` (the global RNGs are not used).
        min_examples_per_client: the least number of examples any client may hold (0 allows empty clients). For
            `"dirichlet"` this is enforced by the rebalancing rule of the module docstring; for `"column"` a smaller
            client raises.

    Returns:
        `list[list[int]]`: one ascending list of example indices per client; together they cover `0..n-1` exactly
        once.

    Raises:
        ValueError: on an invalid argument (the message names it and the allowed values), or when the split is
            impossible (`n < M * min_examples_per_client`).
    """
    _validate_common(num_clients, strategy, dirichlet_alpha, seed, min_examples_per_client)
    if not _is_int(num_examples) or num_examples < 0:
        raise ValueError(f"`num_examples` must be an integer >= 0, got {num_examples!r}.")

    if strategy == "column":
        if client_ids is None:
            raise ValueError("strategy='column' needs `client_ids` (the client key of every example).")
        if len(client_ids) != num_examples:
            raise ValueError(f"`client_ids` has {len(client_ids)} entries but `num_examples` is {num_examples}.")
        clients = _column_split(client_ids, num_clients, min_examples_per_client)
        return [sorted(c) for c in clients]

    _check_enough_examples(num_examples, num_clients, min_examples_per_client)
    rng = np.random.default_rng(seed)
    if strategy == "iid":
        shards = np.array_split(rng.permutation(num_examples), num_clients)
        return [sorted(s.tolist()) for s in shards]

    if labels is None:
        raise ValueError("strategy='dirichlet' needs `labels` (an integer class id per example).")
    label_array = _as_int_labels(labels, num_examples)
    clients = _dirichlet_split(label_array, num_clients, float(dirichlet_alpha), min_examples_per_client, rng)
    return [sorted(c) for c in clients]


def _column_values(dataset: Dataset, column: str, argument: str) -> list:
    if column not in dataset.column_names:
        raise ValueError(
            f"`{argument}`={column!r} is not a column of the dataset; existing columns: {dataset.column_names}."
        )
    # Arrow -> Python in one pass, with any `select`/`shuffle` indices mapping applied.
    table = dataset.select_columns([column]).with_format("arrow")[:]
    return table.column(column).to_pylist()


def _label_array(dataset: Dataset, label_column: str) -> np.ndarray:
    if label_column not in dataset.column_names:
        raise ValueError(
            f"`label_column`={label_column!r} is not a column of the dataset; existing columns: "
            f"{dataset.column_names}."
        )
    feature = dataset.features[label_column]
    if not (isinstance(feature, ClassLabel) or (isinstance(feature, Value) and feature.dtype in _INTEGER_DTYPES)):
        raise ValueError(
            f"`label_column`={label_column!r} must hold integer class ids or a `ClassLabel`, got feature {feature}. "
            "Encode string labels with `dataset.class_encode_column(...)`."
        )
    column = dataset.select_columns([label_column]).with_format("arrow")[:].column(label_column)
    if column.null_count:
        raise ValueError(f"`label_column`={label_column!r} has {column.null_count} missing labels (None).")
    return column.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def partition_dataset(
    dataset: Dataset,
    num_clients: int,
    strategy: str = "iid",
    *,
    dirichlet_alpha: float = 1.0,
    label_column: str = "label",
    client_column: str | None = None,
    seed: int = 0,
    min_examples_per_client: int = 1,
) -> list[Dataset]:
    """Splits `dataset` into the local datasets of `num_clients` clients (see the module docstring for the rules).

    Args:
        dataset: the training set to split.
        num_clients: number of clients `M` (>= 1).
        strategy: `"iid"`, `"dirichlet"` (label skew, `q_k ~ Dirichlet(alpha * 1_M)` per class `k`) or `"column"`.
        dirichlet_alpha: concentration `alpha` (finite, > 0) for `"dirichlet"`; the HiSo paper uses 1.
        label_column: integer or `ClassLabel` column read by `"dirichlet"`.
        client_column: column whose value names each example's client, for `"column"`; it must have exactly
            `num_clients` distinct values, mapped to clients in sorted order.
        seed: seed of the private `numpy.random.Generator`.
        min_examples_per_client: the least number of examples any client may hold.

    Returns:
        `list[datasets.Dataset]`: client `j`'s shard is `dataset.select(indices_j)`, indices ascending.

    Raises:
        ValueError: on an invalid argument (the message names it and lists the allowed values or existing columns),
            or when the split is impossible.
    """
    # Validate the cheap arguments before touching any column, so a typo in `strategy` is reported as such.
    _validate_common(num_clients, strategy, dirichlet_alpha, seed, min_examples_per_client)
    labels = client_ids = None
    if strategy == "dirichlet":
        labels = _label_array(dataset, label_column)
    elif strategy == "column":
        if client_column is None:
            raise ValueError(
                "strategy='column' needs `client_column` (the column naming each example's client); existing "
                f"columns: {dataset.column_names}."
            )
        client_ids = _column_values(dataset, client_column, "client_column")
    shards = partition_indices(
        len(dataset),
        num_clients,
        strategy,
        labels=labels,
        client_ids=client_ids,
        dirichlet_alpha=dirichlet_alpha,
        seed=seed,
        min_examples_per_client=min_examples_per_client,
    )
    return [dataset.select(indices) for indices in shards]


def label_distribution(dataset_shards: Sequence[Dataset], label_column: str = "label") -> list[dict[int, int]]:
    """Counts the examples of each class in each shard, for logging and model cards.

    Args:
        dataset_shards: the client datasets, for example the output of [`partition_dataset`].
        label_column: integer or `ClassLabel` column to count.

    Returns:
        `list[dict[int, int]]`: per shard, `{class_id: count}` with keys ascending (absent classes are left out).
    """
    distribution = []
    for shard in dataset_shards:
        counts = Counter(_label_array(shard, label_column).tolist())
        distribution.append({int(k): int(counts[k]) for k in sorted(counts)})
    return distribution
