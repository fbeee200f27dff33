import numpy as np
import pytest
from datasets import ClassLabel, Dataset

from hf_hiso.federated import label_distribution, partition_dataset, partition_indices


def labelled(n: int = 200, num_classes: int = 4, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset.from_dict(
        {
            "text": [f"example {i}" for i in range(n)],
            "label": rng.integers(0, num_classes, n).tolist(),
            "user": [f"u{i % 3}" for i in range(n)],
        }
    )


def assert_exact_cover(shards: list[list[int]], n: int) -> None:
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n))
    for s in shards:
        assert s == sorted(s)


def skew(labels: np.ndarray, shards: list[list[int]], num_classes: int) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    global_mix = np.bincount(labels, minlength=num_classes) / len(labels)
    tv = [0.5 * np.abs(np.bincount(labels[s], minlength=num_classes) / len(s) - global_mix).sum() for s in shards]
    return float(np.mean(tv))


@pytest.mark.parametrize("strategy", ["iid", "dirichlet"])
@pytest.mark.parametrize("num_clients", [1, 3, 7])
def test_every_index_exactly_once(strategy, num_clients):
    labels = np.random.default_rng(1).integers(0, 5, 101)
    shards = partition_indices(101, num_clients, strategy, labels=labels, seed=3)
    assert len(shards) == num_clients
    assert_exact_cover(shards, 101)
    assert min(len(s) for s in shards) >= 1


def test_iid_sizes_near_equal():
    shards = partition_indices(103, 10, "iid", seed=0)
    sizes = sorted(len(s) for s in shards)
    assert sizes[0] == 10 and sizes[-1] == 11


@pytest.mark.parametrize("strategy", ["iid", "dirichlet"])
def test_reproducible_and_seed_dependent(strategy):
    labels = np.random.default_rng(0).integers(0, 3, 120)
    a = partition_indices(120, 4, strategy, labels=labels, seed=5)
    b = partition_indices(120, 4, strategy, labels=labels, seed=5)
    c = partition_indices(120, 4, strategy, labels=labels, seed=6)
    assert a == b
    assert a != c


def test_global_rng_untouched():
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    partition_indices(50, 3, "dirichlet", labels=[i % 2 for i in range(50)], seed=0)
    partition_indices(50, 3, "iid", seed=0)
    assert np.random.random() == expected


def test_dirichlet_alpha_controls_skew():
    num_classes, n = 5, 2000
    labels = np.random.default_rng(0).integers(0, num_classes, n)

    def mean_skew(alpha: float) -> float:
        splits = [
            partition_indices(n, 10, "dirichlet", labels=labels, dirichlet_alpha=alpha, seed=s) for s in range(3)
        ]
        return float(np.mean([skew(labels, shards, num_classes) for shards in splits]))

    low, high = mean_skew(0.1), mean_skew(100.0)
    assert low > 0.4
    assert high < 0.1
    assert low > 5 * high


def test_dirichlet_no_empty_client_with_tiny_alpha():
    # alpha = 1e-3 gives each class to one client, so 2 classes over 8 clients leaves most clients empty on every
    # draw: the move-from-the-largest fallback must fill them.
    labels = [i % 2 for i in range(40)]
    shards = partition_indices(
        40, 8, "dirichlet", labels=labels, dirichlet_alpha=1e-3, seed=0, min_examples_per_client=3
    )
    assert_exact_cover(shards, 40)
    assert min(len(s) for s in shards) >= 3


def test_dirichlet_exactly_enough_examples():
    shards = partition_indices(12, 4, "dirichlet", labels=[0] * 12, dirichlet_alpha=0.01, min_examples_per_client=3)
    assert [len(s) for s in shards] == [3, 3, 3, 3]
    assert_exact_cover(shards, 12)


def test_min_zero_allows_empty_clients():
    shards = partition_indices(3, 5, "iid", min_examples_per_client=0)
    assert_exact_cover(shards, 3)
    assert sorted(len(s) for s in shards) == [0, 0, 1, 1, 1]


@pytest.mark.parametrize("strategy", ["iid", "dirichlet"])
def test_too_few_examples_raises(strategy):
    with pytest.raises(ValueError, match="min_examples_per_client"):
        partition_indices(5, 3, strategy, labels=[0] * 5, min_examples_per_client=2)


def test_partition_dataset_selects_shards():
    ds = labelled(60)
    shards = partition_dataset(ds, 4, "dirichlet", seed=2)
    assert sum(len(s) for s in shards) == 60
    texts = sorted(t for s in shards for t in s["text"])
    assert texts == sorted(ds["text"])
    expected = partition_indices(60, 4, "dirichlet", labels=ds["label"], seed=2)
    assert [list(s["text"]) for s in shards] == [[ds[i]["text"] for i in ix] for ix in expected]


def test_partition_dataset_after_select_uses_view():
    # Labels must be read through the indices mapping of a selected/shuffled dataset.
    ds = labelled(40).shuffle(seed=0).select(range(30))
    shards = partition_dataset(ds, 3, "dirichlet", seed=0)
    dist = label_distribution(shards)
    total = {}
    for d in dist:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    assert total == dict(sorted(zip(*np.unique(ds["label"], return_counts=True), strict=True)))


def test_classlabel_column_accepted():
    ds = Dataset.from_dict({"label": ["neg", "pos", "pos", "neg"] * 5}).class_encode_column("label")
    assert isinstance(ds.features["label"], ClassLabel)
    shards = partition_dataset(ds, 2, "dirichlet", seed=0)
    assert sum(len(s) for s in shards) == 20


def test_column_strategy_sorted_mapping():
    ds = labelled(30)
    shards = partition_dataset(ds, 3, "column", client_column="user")
    assert [set(s["user"]) for s in shards] == [{"u0"}, {"u1"}, {"u2"}]
    assert sum(len(s) for s in shards) == 30


def test_column_strategy_wrong_count():
    with pytest.raises(ValueError, match="client_column.*3 distinct values.*num_clients"):
        partition_dataset(labelled(30), 4, "column", client_column="user")


def test_column_strategy_too_small_client():
    ids = ["a"] * 5 + ["b"]
    with pytest.raises(ValueError, match="min_examples_per_client"):
        partition_indices(6, 2, "column", client_ids=ids, min_examples_per_client=2)


def test_label_distribution_counts():
    ds = Dataset.from_dict({"label": [0, 0, 1, 2, 2, 2]})
    assert label_distribution([ds.select([0, 1, 2]), ds.select([3, 4, 5])]) == [{0: 2, 1: 1}, {2: 3}]


@pytest.mark.parametrize("num_clients", [0, -1, 2.0, True])
def test_error_num_clients(num_clients):
    with pytest.raises(ValueError, match="`num_clients`"):
        partition_dataset(labelled(10), num_clients)


def test_error_unknown_strategy():
    with pytest.raises(ValueError, match="`strategy`.*'iid', 'dirichlet', 'column'.*'random'"):
        partition_dataset(labelled(10), 2, "random")


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("inf"), float("nan")])
def test_error_dirichlet_alpha(alpha):
    with pytest.raises(ValueError, match="`dirichlet_alpha`.*finite number > 0"):
        partition_dataset(labelled(10), 2, "dirichlet", dirichlet_alpha=alpha)


def test_error_missing_label_column_lists_columns():
    with pytest.raises(ValueError, match=r"`label_column`='labels'.*\['text', 'label', 'user'\]"):
        partition_dataset(labelled(10), 2, "dirichlet", label_column="labels")


def test_error_missing_client_column():
    with pytest.raises(ValueError, match="`client_column`.*columns"):
        partition_dataset(labelled(10), 2, "column")
    with pytest.raises(ValueError, match=r"`client_column`='speaker'.*\['text', 'label', 'user'\]"):
        partition_dataset(labelled(10), 2, "column", client_column="speaker")


@pytest.mark.parametrize(
    "values",
    [["a", "b"] * 5, [0.5, 1.0] * 5, [[0], [1]] * 5],
    ids=["string", "float", "sequence"],
)
def test_error_non_integer_labels(values):
    ds = Dataset.from_dict({"label": values})
    with pytest.raises(ValueError, match="`label_column`='label' must hold integer class ids or a `ClassLabel`"):
        partition_dataset(ds, 2, "dirichlet")


def test_error_missing_labels():
    ds = Dataset.from_dict({"label": [0, None, 1, 1]})
    with pytest.raises(ValueError, match="`label_column`.*missing"):
        partition_dataset(ds, 2, "dirichlet")


def test_error_non_integer_labels_raw():
    with pytest.raises(ValueError, match="`labels` must be integers"):
        partition_indices(4, 2, "dirichlet", labels=[0.0, 1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="needs `labels`"):
        partition_indices(4, 2, "dirichlet")
    with pytest.raises(ValueError, match="`labels` has 3 entries"):
        partition_indices(4, 2, "dirichlet", labels=[0, 1, 0])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"seed": -1}, "seed"), ({"min_examples_per_client": -1}, "min_examples_per_client")],
)
def test_error_other_fields(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        partition_dataset(labelled(10), 2, **kwargs)
