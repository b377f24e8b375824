"""Secure aggregation: the sum equals plain aggregation within the stated quantisation bound;
a masked input alone looks uniform and uncorrelated with the plain one; dropouts after submitting
are recovered, before submitting excluded; fewer than t sites abort without revealing anything;
sites refuse requests that would unmask one input; messages from another run or round fail."""

import dataclasses
import json
import math
import struct

import numpy as np
import pytest
from scipy import stats

from nordfl.runtime import secagg
from nordfl.runtime.secagg import (
    Advertise,
    ForwardedShares,
    MaskedInput,
    Roster,
    SecAggAborted,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    ShareKeys,
    UnmaskRefused,
    UnmaskRequest,
    UnmaskShares,
)


def seeded(seed):
    """Reproducible randomness for the protocol objects (tests only)."""
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


def wire(msg):
    """Every message crosses a simulated wire as bytes."""
    return type(msg).from_bytes(msg.to_bytes())


def inputs(cfg, d, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-scale, scale, d).astype(np.float32) for i in range(1, cfg.num_sites + 1)}


def keyed(cfg, length, *, gone_after_advertise=(), run_id="run-a", round_index=3, seed=0):
    """Steps 0 and 1 for every site: the server, the clients, and the forwarded shares."""
    server = SecAggServer(cfg, run_id, round_index, length=length)
    clients = {i: SecAggClient(cfg, run_id, round_index, i, random_bytes=seeded(seed * 1000 + i))
               for i in range(1, cfg.num_sites + 1)}
    for c in clients.values():
        server.add_advertise(wire(c.advertise()))
    roster = wire(server.roster())
    for i, c in clients.items():
        if i not in gone_after_advertise:
            server.add_shares(wire(c.share_keys(roster)))
    return server, clients, server.forward_shares()


def run_round(cfg, xs, *, gone_after_advertise=(), gone_after_shares=(), gone_after_input=(), **session):
    """The whole protocol in-process; a site in ``gone_after_X`` sends nothing after step X."""
    server, clients, forwarded = keyed(cfg, len(xs[1]), gone_after_advertise=gone_after_advertise, **session)
    for i, c in clients.items():
        if i in forwarded and i not in gone_after_shares:
            server.add_masked_input(wire(c.masked_input(xs[i], wire(forwarded[i]))))
    request = wire(server.unmask_request())
    for i in request.survivors:
        if i not in gone_after_input:
            server.add_unmask_shares(wire(clients[i].unmask(request)))
    return server.result(), server, clients


def plain_sum(xs, sites, cfg):
    return sum(np.clip(xs[i].astype(np.float64), -cfg.clip_range, cfg.clip_range) for i in sites)


# --- configuration and quantisation ---------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    ({"num_sites": 1, "threshold": 1, "clip_range": 1.0}, "num_sites=1"),
    ({"num_sites": 4, "threshold": 2, "clip_range": 1.0}, "threshold=2"),
    ({"num_sites": 4, "threshold": 5, "clip_range": 1.0}, "threshold=5"),
    ({"num_sites": 4, "threshold": 3, "clip_range": 0.0}, "clip_range=0.0"),
    ({"num_sites": 4, "threshold": 3, "clip_range": float("inf")}, "clip_range=inf"),
    ({"num_sites": 5, "threshold": 3, "clip_range": 1.0, "bits": 62}, "bits=62"),
    ({"num_sites": 4, "threshold": 3, "clip_range": 1.0, "bits": 1}, "bits=1"),
])
def test_config_rejects_bad_values_naming_field_and_expectation(kwargs, field):
    with pytest.raises(SecAggError, match="expected") as err:
        SecAggConfig(**kwargs)
    assert field in str(err.value)


def test_config_for_round_picks_the_smallest_safe_threshold():
    assert SecAggConfig.for_round(4, min_sites=2, clip_range=1.0).threshold == 3
    assert SecAggConfig.for_round(5, min_sites=3, clip_range=1.0).threshold == 3
    assert SecAggConfig.for_round(5, min_sites=5, clip_range=1.0).threshold == 5
    with pytest.raises(SecAggError, match=r"min_sites=6: expected an integer in \[1, num_sites=5\]"):
        SecAggConfig.for_round(5, min_sites=6, clip_range=1.0)


def test_quantisation_error_is_at_most_half_a_step_and_reaches_it():
    cfg = SecAggConfig(num_sites=3, threshold=2, clip_range=2.0, bits=12)
    x = np.random.default_rng(1).uniform(-3, 3, 20_000).astype(np.float32)
    err = np.abs(secagg.dequantise_sum(secagg.quantise(x, cfg), cfg) - np.clip(x, -2, 2))
    assert err.max() <= cfg.error_bound(1) * (1 + 1e-12)
    assert err.max() > 0.99 * cfg.error_bound(1)  # the bound is tight
    assert cfg.error_bound(1) == pytest.approx(2.0 / (2 * (2**11 - 1)))
    with pytest.raises(SecAggError, match="non-finite"):
        secagg.quantise(np.array([0.0, np.nan], np.float32), cfg)


@pytest.mark.parametrize("bits", [2, 8, 61])
def test_field_holds_the_extreme_sums_without_wrapping(bits):
    cfg = SecAggConfig(num_sites=5, threshold=3, clip_range=1.5, bits=bits)
    assert cfg.field_bits == bits + 3
    for sign in (1.0, -1.0):
        q = secagg.quantise(np.full(4, 9.0 * sign), cfg)  # clipped to +-R
        total = sum(q for _ in range(5)) & np.uint64((1 << cfg.field_bits) - 1)
        np.testing.assert_allclose(secagg.dequantise_sum(total, cfg), 5 * 1.5 * sign, rtol=1e-12)


# --- correctness and dropouts ---------------------------------------------------------------------


@pytest.fixture
def reconstructions(monkeypatch):
    """Counts every secret the server rebuilds."""
    calls = []
    real = secagg.shamir_reconstruct
    monkeypatch.setattr(secagg, "shamir_reconstruct", lambda shares: calls.append(shares) or real(shares))
    return calls


def test_secure_sum_equals_plain_sum_within_the_stated_bound():
    cfg = SecAggConfig(num_sites=5, threshold=3, clip_range=1.0, bits=10)
    xs = inputs(cfg, 3000, scale=1.2)  # some values are clipped
    result, server, _ = run_round(cfg, xs)
    assert result.sites == (1, 2, 3, 4, 5) == server.u4
    err = np.abs(result.total - plain_sum(xs, result.sites, cfg))
    assert result.error_bound == pytest.approx(5 * 1.0 / (2 * 511))
    assert err.max() <= result.error_bound * (1 + 1e-9)
    assert err.max() > 0.5 * result.error_bound  # not absurdly loose


def test_site_that_drops_after_submitting_is_recovered(reconstructions):
    cfg = SecAggConfig(num_sites=5, threshold=3, clip_range=1.0, bits=16)
    xs = inputs(cfg, 500, seed=2)
    result, server, _ = run_round(cfg, xs, gone_after_input=(2, 5))
    assert result.sites == (1, 2, 3, 4, 5) and server.u4 == (1, 3, 4)
    assert len(reconstructions) == 5 and all(len(s) == 3 for s in reconstructions)  # five b's, t shares each
    assert np.abs(result.total - plain_sum(xs, result.sites, cfg)).max() <= result.error_bound


@pytest.mark.parametrize("when", ["gone_after_advertise", "gone_after_shares"])
def test_site_that_drops_before_submitting_is_excluded(when):
    cfg = SecAggConfig(num_sites=5, threshold=3, clip_range=1.0, bits=16)
    xs = inputs(cfg, 500, seed=3)
    result, _, _ = run_round(cfg, xs, **{when: (1, 4)})
    assert result.sites == (2, 3, 5)
    assert np.abs(result.total - plain_sum(xs, (2, 3, 5), cfg)).max() <= result.error_bound
    assert np.abs(result.total - plain_sum(xs, range(1, 6), cfg)).max() > 10 * result.error_bound


def test_dropouts_at_every_step_together():
    cfg = SecAggConfig(num_sites=7, threshold=4, clip_range=1.0, bits=20)
    xs = inputs(cfg, 200, seed=4)
    result, server, _ = run_round(cfg, xs, gone_after_advertise=(7,), gone_after_shares=(1,),
                                  gone_after_input=(3,))
    assert (server.u1, server.u2, server.u3, server.u4) == (
        (1, 2, 3, 4, 5, 6, 7), (1, 2, 3, 4, 5, 6), (2, 3, 4, 5, 6), (2, 4, 5, 6))
    assert result.sites == (2, 3, 4, 5, 6)
    assert np.abs(result.total - plain_sum(xs, result.sites, cfg)).max() <= result.error_bound


# --- aborts reveal nothing ------------------------------------------------------------------------


def test_fewer_than_t_submitters_abort_before_any_share_is_requested(reconstructions):
    cfg = SecAggConfig(num_sites=5, threshold=3, clip_range=1.0, bits=16)
    with pytest.raises(SecAggAborted, match=r"only 2 of the needed 3 sites sent masked inputs"):
        run_round(cfg, inputs(cfg, 50), gone_after_shares=(1, 2, 3))
    assert reconstructions == []


def test_fewer_than_t_unmask_replies_abort_without_reconstructing(reconstructions):
    cfg = SecAggConfig(num_sites=5, threshold=3, clip_range=1.0, bits=16)
    with pytest.raises(SecAggAborted, match=r"only 2 of the needed 3 sites sent unmask shares"):
        run_round(cfg, inputs(cfg, 50), gone_after_input=(1, 2, 5))
    assert reconstructions == []


def test_fewer_than_t_advertisers_or_sharers_abort():
    cfg = SecAggConfig(num_sites=3, threshold=2, clip_range=1.0)
    server = SecAggServer(cfg, "r", 0, length=4)
    server.add_advertise(SecAggClient(cfg, "r", 0, 1).advertise())
    with pytest.raises(SecAggAborted, match="only 1 of the needed 2 sites advertised keys"):
        server.roster()
    with pytest.raises(SecAggAborted, match="only 1 of the needed 2 sites shared keys"):
        run_round(cfg, inputs(cfg, 4), gone_after_advertise=(1, 2))


def _clients_after_masking(cfg, drop=()):
    """Clients and server right after step 2; sites in ``drop`` did not send a masked input."""
    xs = inputs(cfg, 8)
    server, clients, fwd = keyed(cfg, 8, run_id="r", round_index=0)
    for i, c in clients.items():
        if i not in drop:
            server.add_masked_input(c.masked_input(xs[i], fwd[i]))
    return clients, server


def test_site_refuses_to_reveal_both_shares_for_one_site():
    cfg = SecAggConfig(num_sites=4, threshold=3, clip_range=1.0)
    clients, server = _clients_after_masking(cfg, drop=(4,))
    honest = server.unmask_request()
    assert honest.dropped == (4,)
    with pytest.raises(UnmaskRefused, match=r"sites \[2\] would have both"):
        clients[1].unmask(UnmaskRequest("r", 0, (1, 2, 3), (2, 4)))
    assert clients[1].unmask(honest) == clients[1].unmask(honest)  # a lost reply may be asked again
    # Having revealed site 2's b share and site 4's key share, site 1 never reveals the others.
    with pytest.raises(UnmaskRefused, match=r"sites \[2, 4\] would have both"):
        clients[1].unmask(UnmaskRequest("r", 0, (1, 3, 4), (2,)))
    with pytest.raises(UnmaskRefused, match="only 2 survivors, fewer than the threshold 3"):
        clients[3].unmask(UnmaskRequest("r", 0, (1, 3), (2, 4)))
    with pytest.raises(SecAggError, match="late or replayed"):
        clients[3].unmask(dataclasses.replace(honest, round=1))
    with pytest.raises(UnmaskRefused, match="listed as dropped"):
        clients[2].unmask(UnmaskRequest("r", 0, (1, 3, 4), (2,)))


# --- privacy of a single masked input -------------------------------------------------------------


def test_masked_input_alone_is_uniform_and_uncorrelated_with_the_plain_input():
    cfg = SecAggConfig(num_sites=3, threshold=2, clip_range=1.0, bits=12)
    modulus = 2.0**cfg.field_bits
    rng = np.random.default_rng(5)
    plain, masked, quantised = [], [], []
    for draw in range(250):
        xs = {i: rng.uniform(-1, 1, 8).astype(np.float32) for i in (1, 2, 3)}
        _, clients, forwarded = keyed(cfg, 8, round_index=draw, seed=draw)
        y = clients[1].masked_input(xs[1], forwarded[1]).y
        plain.append(xs[1])
        masked.append(y / modulus)
        quantised.append(secagg.quantise(xs[1], cfg) / modulus)
    plain, masked, quantised = (np.concatenate(v) for v in (plain, masked, quantised))
    n = len(plain)
    # |r| of independent samples is about 1/sqrt(n); 4/sqrt(n) is a ~1e-4 false alarm.
    assert abs(np.corrcoef(plain, masked)[0, 1]) < 4 / np.sqrt(n)
    assert stats.kstest(masked, "uniform").pvalue > 1e-3
    counts = np.histogram(masked, bins=16, range=(0, 1))[0]
    assert stats.chisquare(counts).pvalue > 1e-3
    # The same checks catch an unmasked input: they can fail.
    assert abs(np.corrcoef(plain, np.where(quantised >= 0.5, quantised - 1, quantised))[0, 1]) > 0.99
    assert stats.kstest(quantised, "uniform").pvalue < 1e-6


# --- replay and tampering -------------------------------------------------------------------------


def test_messages_from_another_round_or_run_are_rejected_and_the_round_goes_on():
    cfg = SecAggConfig(num_sites=3, threshold=2, clip_range=1.0)
    server = SecAggServer(cfg, "run-a", 4, length=8)
    for run_id, rnd in (("run-a", 3), ("run-b", 4)):
        with pytest.raises(SecAggError, match="late or replayed"):
            server.add_advertise(SecAggClient(cfg, run_id, rnd, 1).advertise())
    advert = SecAggClient(cfg, "run-a", 4, 1).advertise()
    server.add_advertise(advert)
    with pytest.raises(SecAggError, match="a second Advertise from site 1"):
        server.add_advertise(advert)
    with pytest.raises(SecAggError, match="roster"):
        SecAggClient(cfg, "run-a", 4, 2).share_keys(Roster("run-a", 4, {1: b"x" * 32}, {1: b"y" * 32}))
    with pytest.raises(SecAggError, match="unusable X25519 public key"):
        secagg._pair_seed(secagg.X25519PrivateKey.generate(), bytes(32), b"", 1, 2)  # low-order point


@pytest.mark.parametrize("other", [{"run_id": "run-b"}, {"round_index": 4}])
def test_share_ciphertexts_are_bound_to_run_round_sender_and_recipient(other):
    """Same keys (same randomness) in two sessions: a ciphertext from one, relabelled for the
    other, fails authentication, because the run id and round are in the key and the AD."""
    cfg = SecAggConfig(num_sites=3, threshold=2, clip_range=1.0)

    _, clients_a, fwd_a = keyed(cfg, 4)
    _, clients_b, fwd_b = keyed(cfg, 4, **other)
    assert all(clients_a[i]._c_sk.private_bytes_raw() == clients_b[i]._c_sk.private_bytes_raw() for i in (1, 2, 3))
    assert fwd_a[1].ciphertexts.keys() == fwd_b[1].ciphertexts.keys()
    replayed = dataclasses.replace(fwd_b[1], ciphertexts=fwd_a[1].ciphertexts)
    with pytest.raises(SecAggError, match="fail authentication"):
        clients_b[1].masked_input(np.zeros(4, np.float32), replayed)
    swapped = dataclasses.replace(fwd_a[1], ciphertexts={2: fwd_a[1].ciphertexts[3], 3: fwd_a[1].ciphertexts[2]})
    with pytest.raises(SecAggError, match="fail authentication"):
        clients_a[1].masked_input(np.zeros(4, np.float32), swapped)
    clients_a[1].masked_input(np.zeros(4, np.float32), fwd_a[1])  # the genuine one still works


def test_server_rejects_malformed_masked_inputs():
    cfg = SecAggConfig(num_sites=3, threshold=2, clip_range=1.0, bits=8)
    _, server = _clients_after_masking(cfg, drop=(1, 2, 3))
    for y, what in ((np.zeros(7, np.uint64), r"\(7,\)"), (np.full(8, 2**20, np.uint64), "values >= 2")):
        with pytest.raises(SecAggError, match=what):
            server.add_masked_input(MaskedInput("r", 0, 1, y))
    with pytest.raises(SecAggError, match="not one of"):
        server.add_masked_input(MaskedInput("r", 0, 9, np.zeros(8, np.uint64)))


# --- wire format, Shamir, helpers -----------------------------------------------------------------


def test_messages_round_trip_and_garbage_is_rejected():
    msgs = [Advertise("r", 1, 2, b"a" * 32, b"b" * 32), Roster("r", 1, {1: b"k"}, {1: b"s"}),
            ShareKeys("r", 1, 2, {1: b"ct"}), ForwardedShares("r", 1, 1, {2: b"ct"}),
            UnmaskRequest("r", 1, (1, 2), (3,)), UnmaskShares("r", 1, 2, {1: secagg.PRIME - 1}, {3: 5})]
    for m in msgs:
        assert type(m).from_bytes(m.to_bytes()) == m
    y = np.arange(5, dtype=np.uint64) * np.uint64(2**61)
    back = MaskedInput.from_bytes(MaskedInput("r", 1, 2, y).to_bytes())
    np.testing.assert_array_equal(back.y, y)
    small = np.array([0, 2**32 - 1], np.uint64)
    packed = MaskedInput("r", 1, 2, small).to_bytes()
    assert len(packed) < len(MaskedInput("r", 1, 2, y[:2]).to_bytes()) - 7  # 4 bytes a value
    np.testing.assert_array_equal(MaskedInput.from_bytes(packed).y, small)
    data = MaskedInput("r", 1, 2, y).to_bytes()
    for bad, what in ((data[:-1], "payload"), (b"junk", "not a secure-aggregation"),
                      (msgs[0].to_bytes(), "expected a MaskedInput")):
        with pytest.raises(SecAggError, match=what):
            MaskedInput.from_bytes(bad)
    head = json.dumps({"type": "Advertise", "run_id": "r", "round": 1, "site": "2", "c_pk": "", "s_pk": ""})
    forged = b"NFSA1" + struct.pack("<I", len(head)) + head.encode()
    with pytest.raises(SecAggError, match="field 'site'"):
        Advertise.from_bytes(forged)


def test_shamir_any_t_shares_rebuild_and_t_minus_1_are_consistent_with_every_secret():
    secret = int.from_bytes(bytes(range(32)), "big")
    shares = secagg.shamir_share(secret, range(1, 6), 3)
    for subset in ((1, 2, 3), (2, 4, 5), (5, 1, 3), (1, 2, 3, 4, 5)):
        assert secagg.shamir_reconstruct({x: shares[x] for x in subset}) == secret
    two = {1: shares[1], 4: shares[4]}
    assert secagg.shamir_reconstruct(two) != secret
    # Any candidate secret, with the 2 shares, defines a degree-2 polynomial that passes through
    # both: the 2 shares rule nothing out.
    for candidate in (0, 1, secret + 1, secagg.PRIME - 1):
        points = {**two, 0: candidate}

        def f(z, points=points):
            return sum(y * math.prod([(z - xj) * pow(xi - xj, -1, secagg.PRIME) for xj in points if xj != xi])
                       for xi, y in points.items()) % secagg.PRIME

        assert [f(0), f(1), f(4)] == [candidate, shares[1], shares[4]]


def test_flatten_and_unflatten_arrays():
    arrays = [np.ones((2, 3), np.float32), np.arange(4, dtype=np.float32), np.float32(7.0).reshape(())]
    vec, shapes = secagg.flatten_arrays(arrays)
    assert vec.dtype == np.float32 and vec.shape == (11,)
    for a, b in zip(secagg.unflatten_arrays(vec, shapes), arrays):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(SecAggError, match="length 10, expected 11"):
        secagg.unflatten_arrays(vec[:10], shapes)
