"""Partitioners: every row exactly once, and the heterogeneity they promise."""

import numpy as np
import pytest

from nordfl.tasks import partition

RNG_SEED = 0
LABELS = np.repeat(np.arange(10), 100)[np.random.default_rng(1).permutation(1000)]


def _assert_exact_cover(parts, n):
    allrows = np.concatenate(parts)
    assert len(allrows) == n
    np.testing.assert_array_equal(np.sort(allrows), np.arange(n))


def test_iid_shares_are_equal_and_cover():
    parts = partition.iid(1003, 10, np.random.default_rng(RNG_SEED))
    _assert_exact_cover(parts, 1003)
    assert {len(p) for p in parts} == {100, 101}


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_dirichlet_covers_and_skews_with_small_alpha(alpha):
    parts = partition.dirichlet_label_skew(LABELS, 20, alpha, np.random.default_rng(RNG_SEED))
    _assert_exact_cover(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 1


def test_dirichlet_alpha_controls_label_concentration():
    def mean_top_share(alpha):
        parts = partition.dirichlet_label_skew(LABELS, 20, alpha, np.random.default_rng(RNG_SEED))
        return np.mean([np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts])

    skewed, balanced = mean_top_share(0.1), mean_top_share(100.0)
    assert skewed > 0.6  # most of a client's rows come from one class
    assert balanced < 0.2  # near the IID 0.1 (plus sampling noise)


def test_dirichlet_that_cannot_fill_every_client_fails_clearly():
    with pytest.raises(ValueError, match=r"dirichlet_label_skew: no draw in 3 tries gave every client min_size=60"):
        partition.dirichlet_label_skew(LABELS, 20, 0.05, np.random.default_rng(0), min_size=60, max_tries=3)
    parts = partition.dirichlet_label_skew(LABELS, 200, 0.01, np.random.default_rng(0), allow_empty=True)
    _assert_exact_cover(parts, len(LABELS))


@pytest.mark.parametrize("k, num_clients", [(1, 10), (2, 20), (3, 7)])
def test_k_classes_per_client_gives_exactly_k_classes(k, num_clients):
    parts = partition.k_classes_per_client(LABELS, num_clients, k, np.random.default_rng(RNG_SEED))
    _assert_exact_cover(parts, len(LABELS))
    assert [len(np.unique(LABELS[p])) for p in parts] == [k] * num_clients


def test_k_classes_rejects_impossible_settings():
    with pytest.raises(ValueError, match=r"k_classes_per_client: k must be an integer in \[1, 10\], got 11"):
        partition.k_classes_per_client(LABELS, 5, 11, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"num_clients \* k = 4 < 10 classes"):
        partition.k_classes_per_client(LABELS, 2, 2, np.random.default_rng(0))


def test_quantity_skew_lognormal_spread_follows_sigma():
    n, clients = 200_000, 400
    parts = partition.quantity_skew(n, clients, np.random.default_rng(3), sigma=1.0, min_size=0)
    _assert_exact_cover(parts, n)
    log_sizes = np.log([len(p) for p in parts])
    assert np.std(log_sizes) == pytest.approx(1.0, abs=0.1)


def test_quantity_skew_power_law_ranks():
    parts = partition.quantity_skew(10_000, 10, np.random.default_rng(3), distribution="power_law", exponent=1.0)
    _assert_exact_cover(parts, 10_000)
    sizes = np.sort([len(p) for p in parts])[::-1]
    # share of rank r is proportional to 1/r: the largest is ~2x the second and ~10x the tenth.
    assert sizes[0] / sizes[1] == pytest.approx(2.0, rel=0.01)
    assert sizes[0] / sizes[9] == pytest.approx(10.0, rel=0.02)


def test_quantity_skew_refuses_an_empty_client():
    with pytest.raises(ValueError, match=r"quantity_skew: 30 clients x min_size=1 needs more than the 20 rows"):
        partition.quantity_skew(20, 30, np.random.default_rng(0))


def test_feature_shift_noise_grows_with_client_index():
    x = np.zeros((4000, 3), np.float32)
    parts = partition.iid(4000, 4, np.random.default_rng(0))
    shifted = partition.feature_shift(x, parts, sigma=2.0, rng=np.random.default_rng(1))
    stds = [shifted[p].std() for p in parts]
    np.testing.assert_allclose(stds, [0.0, 0.5, 1.0, 1.5], atol=0.05)
    np.testing.assert_array_equal(x, 0.0)  # the input is not modified


def test_natural_split_by_site_column():
    sites = np.array(["Oslo", "Tartu", "Oslo", "Turku", "Tartu"])
    names, parts = partition.natural(sites)
    assert names == ["Oslo", "Tartu", "Turku"]
    _assert_exact_cover(parts, 5)
    np.testing.assert_array_equal(parts[0], [0, 2])


def test_bad_client_count_is_named():
    with pytest.raises(ValueError, match=r"iid: num_clients must be an integer >= 1, got 0"):
        partition.iid(10, 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"iid: clients \[10, 11\] got no rows"):
        partition.iid(10, 12, np.random.default_rng(0))


def test_repartition_keeps_every_row_and_applies_the_partitioner():
    from nordfl.tasks import synthetic

    data = synthetic(1.0, 1.0, num_devices=5, seed=0)
    total = sum(data.train_sizes()) + sum(data.test_sizes())
    assert partition.repartition(data, "natural") is data
    split = partition.repartition(data, "k_classes", num_clients=6, k=2, seed=1)
    assert len(split.clients) == 6
    assert sum(split.train_sizes()) + sum(split.test_sizes()) == total
    for c in split.clients:
        assert len(np.unique(np.concatenate([c.train.y, c.test.y]))) == 2
    with pytest.raises(ValueError, match="partition.name: unknown name 'shards'; expected one of dirichlet, feature_shift, iid, k_classes, natural, quantity_skew"):
        partition.repartition(data, "shards", num_clients=3)
    with pytest.raises(ValueError, match="partition.iid: missing hyperparameter 'num_clients'"):
        partition.repartition(data, "iid")
    with pytest.raises(ValueError, match="partition.num_clients: must be an integer >= 1 for partitioner 'iid', got 0"):
        partition.repartition(data, "iid", num_clients=0)
    with pytest.raises(ValueError, match="partition.k_classes: unknown hyperparameter 'alpha'; expected one of num_clients, test_fraction, k"):
        partition.repartition(data, "k_classes", num_clients=3, alpha=0.1)


def test_validation_pooled_and_single_client_views_keep_every_training_row_once():
    from nordfl.tasks.data import pooled_dataset, single_client, validation_split
    from nordfl.tasks import heart

    data = heart()
    val = validation_split(data, 0.25, seed=3)
    for original, split in zip(data.clients, val.clients):
        # validation rows come from the training rows only: the test set is never seen
        rows = np.concatenate([split.train.x, split.test.x])
        assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, original.train.x.tolist()))
        assert len(split.test.y) == int(np.ceil(0.25 * len(original.train.y)))
    pooled = pooled_dataset(data)
    assert len(pooled.clients) == 1
    assert len(pooled.clients[0].train.y) == sum(data.train_sizes())
    np.testing.assert_array_equal(pooled.clients[0].test.y, data.pooled_test().y)
    alone = single_client(data, 2)
    assert [c.name for c in alone.clients] == [data.clients[2].name]
