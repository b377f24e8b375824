"""FedProx Synthetic(alpha, beta): the construction's statistics."""

import numpy as np
import pytest

from nordfl.tasks import synthetic


def _all_x(data):
    return [np.concatenate([c.train.x, c.test.x]) for c in data.clients]


def test_defaults_and_sizes():
    data = synthetic(1.0, 1.0, seed=0)
    assert len(data.clients) == 30 and data.feature_shape == (60,) and data.num_classes == 10
    sizes = np.add(data.train_sizes(), data.test_sizes())
    assert sizes.min() >= 50
    again = synthetic(1.0, 1.0, seed=0)
    np.testing.assert_array_equal(again.clients[3].train.x, data.clients[3].train.x)


def test_feature_covariance_is_diag_j_pow_minus_1_2():
    data = synthetic(0.0, 0.0, num_devices=100, seed=1)
    centred = np.concatenate([x - x.mean(axis=0) for x in _all_x(data)])
    want = np.arange(1, 61) ** -1.2
    np.testing.assert_allclose(centred.var(axis=0), want, rtol=0.1)


def test_beta_spreads_the_device_feature_means():
    def spread(beta):
        data = synthetic(0.0, beta, num_devices=200, seed=2)
        return np.std([x.mean() for x in _all_x(data)])

    # mean over 60 dims of v_k ~ N(B_k, 1) is about B_k ~ N(0, beta), plus N(0, 1/60).
    assert spread(0.0) == pytest.approx(np.sqrt(1 / 60), rel=0.25)
    assert spread(2.0) == pytest.approx(np.sqrt(4 + 1 / 60), rel=0.25)


def test_iid_devices_share_one_labelling():
    data = synthetic(num_devices=40, iid=True, seed=3)
    # Shared W, b and x ~ N(0, Sigma): every device sees the same label distribution.
    dists = np.array([np.bincount(c.train.y, minlength=10) / len(c.train.y) for c in data.clients if len(c.train.y) > 200])
    assert np.abs(dists - dists.mean(axis=0)).max() < 0.15
    skewed = synthetic(1.0, 1.0, num_devices=40, seed=3)
    top = [np.bincount(c.train.y, minlength=10).max() / len(c.train.y) for c in skewed.clients]
    assert np.mean(top) > 0.4  # non-IID devices are dominated by a few classes


@pytest.mark.parametrize("kwargs, message", [({"alpha": -1.0}, "alpha must be >= 0"), ({"num_devices": 0}, "num_devices must be")])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthetic(**kwargs)


def test_split_seed_redraws_only_the_test_rows_of_the_same_devices():
    base = synthetic(1.0, 1.0, num_devices=5, seed=0)
    same = synthetic(1.0, 1.0, num_devices=5, seed=0, split_seed=0)
    resplit = synthetic(1.0, 1.0, num_devices=5, seed=0, split_seed=1)
    other = synthetic(1.0, 1.0, num_devices=5, seed=1)
    for a, s, b in zip(base.clients, same.clients, resplit.clients):
        np.testing.assert_array_equal(a.test.x, s.test.x)  # split_seed defaults to the data seed
        np.testing.assert_array_equal(np.sort(_all_x_one(a), axis=0), np.sort(_all_x_one(b), axis=0))  # the same device's rows
        assert len(a.test.y) == len(b.test.y) and not np.array_equal(a.test.x, b.test.x)  # dealt differently
    # The data seed, by contrast, draws other devices (other sizes too).
    assert [len(c.train.y) + len(c.test.y) for c in other.clients] != [len(c.train.y) + len(c.test.y) for c in base.clients]


def _all_x_one(client):
    return np.concatenate([client.train.x, client.test.x])
