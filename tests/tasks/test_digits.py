"""The vendored digits: the shipped file is the one scikit-learn bundles, and it federates."""

import gzip
from importlib import resources

import numpy as np

from nordfl.tasks import make_task
from nordfl.tasks.digits import NUM_ROWS, load_digits
from nordfl.tasks.partition import repartition


def test_digits_are_the_1797_uci_images_with_balanced_labels():
    x, y = load_digits()
    assert x.shape == (NUM_ROWS, 64) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    counts = np.bincount(y, minlength=10)
    assert counts.sum() == NUM_ROWS and counts.min() >= 174 and counts.max() <= 183  # the UCI test set's class sizes
    # The first image is sklearn's digits.images[0], a zero; spot-check its pixels from the raw file.
    raw = gzip.decompress(resources.files("nordfl.tasks").joinpath("data", "digits.csv.gz").read_bytes())
    first = np.array(raw.split(b"\n", 1)[0].split(b","), dtype=np.float32)
    np.testing.assert_array_equal(x[0] * 16, first[:64])
    assert y[0] == first[64] == 0


def test_digits_task_partitions_into_label_skewed_clients():
    task = make_task("digits", seed=0)
    assert len(task.data.clients) == 1 and task.data.num_classes == 10
    skewed = repartition(task.data, "k_classes", num_clients=10, k=1, seed=0)
    labels = [np.unique(np.concatenate([c.train.y, c.test.y])) for c in skewed.clients]
    assert all(len(classes) == 1 for classes in labels)
    assert sum(len(c.train.y) + len(c.test.y) for c in skewed.clients) == NUM_ROWS
