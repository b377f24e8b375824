"""The audit log chains every entry to the one before, and verify names the first line that was tampered with."""

import hashlib
import json
import re
import threading

import pytest

from nordfl.runtime.audit import GENESIS, AuditError, AuditLog, cross_check, sha256_hex, verify, verify_main


def _spec_hash(entry):
    """The hash exactly as documented, computed independently of the module."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _write(path, n=5, actor="coordinator"):
    with AuditLog(path, actor) as log:
        log.record("connect", site="Cleveland")
        for i in range(1, n):
            log.record("update_received", round=i, site="Cleveland", sha256=sha256_hex(b"update %d" % i), accepted=True)


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def _set_lines(path, lines):
    path.write_text("".join(lines), encoding="utf-8")


def test_written_log_verifies_and_follows_the_documented_format(tmp_path):
    path = tmp_path / "sub" / "dir" / "audit.jsonl"  # parent dirs are created
    _write(path, n=5)
    report = verify(path)
    assert report == (True, 5, None, "chain intact")

    entries = [json.loads(line) for line in _lines(path)]
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0]["prev"] == GENESIS == "0" * 64
    assert list(entries[1]) == ["seq", "time", "actor", "event", "round", "site", "sha256", "accepted", "prev", "hash"]
    for before, entry in zip(entries, entries[1:]):
        assert entry["prev"] == before["hash"]
    for entry in entries:
        assert entry["hash"] == _spec_hash(entry)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
        assert entry["actor"] == "coordinator"


def test_record_returns_the_entry_written(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, "site-Hungary") as log:
        entry = log.record("update_sent", round=1, sha256=sha256_hex(b"x"), shape=(2, 3), note="naïve ✓")
        assert log.seq == 1 and log.last_hash == entry["hash"]
    assert json.loads(_lines(path)[0]) == entry
    assert entry["shape"] == [2, 3]  # normalised as it will be read back, so the hash still verifies
    assert "naïve ✓" in path.read_text(encoding="utf-8")  # readable by a human, not \u-escaped
    assert sha256_hex(b"x") == hashlib.sha256(b"x").hexdigest()
    assert verify(path).ok


def test_reopening_continues_the_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write(path, n=3)
    last = json.loads(_lines(path)[-1])
    with AuditLog(path, "coordinator") as log:
        assert (log.seq, log.last_hash) == (3, last["hash"])
        entry = log.record("round_start", round=4)
    assert entry["seq"] == 4 and entry["prev"] == last["hash"]
    assert verify(path) == (True, 4, None, "chain intact")


def test_empty_existing_file_starts_a_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.touch()
    report = verify(path)  # an emptied log is not "OK: 0 entries" (issue 15): it is an error
    assert not report.ok and report.entries == 0 and "is empty" in report.reason
    with AuditLog(path, "coordinator") as log:
        assert log.record("start")["prev"] == GENESIS
    assert verify(path).entries == 1


@pytest.mark.parametrize("field, value", [("reason", "norm within bound"), ("sha256", sha256_hex(b"other update")), ("seq", 9)])
def test_editing_one_field_is_caught_at_that_line(tmp_path, field, value):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, "coordinator") as log:
        log.record("connect", site="VA Long Beach")
        log.record("round_start", round=1)
        log.record("update_rejected", round=1, site="VA Long Beach", sha256=sha256_hex(b"bad"), reason="norm 13.2 above clip 10")
        log.record("update_received", round=1, site="Hungary", sha256=sha256_hex(b"good"))
        log.record("round_end", round=1)
    lines = _lines(path)
    entry = json.loads(lines[2])  # line 3, the rejection
    assert field in entry and entry[field] != value
    entry[field] = value
    lines[2] = json.dumps(entry, ensure_ascii=False) + "\n"
    _set_lines(path, lines)
    assert verify(path) == (False, 2, 3, "hash mismatch (entry edited)")


def test_deleting_a_middle_line_is_caught_at_the_next_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write(path, n=5)
    lines = _lines(path)
    del lines[2]
    _set_lines(path, lines)
    report = verify(path)
    assert report == (False, 2, 3, "prev does not match line 2's hash (entry removed or reordered)")


def test_deleting_the_first_line_is_caught(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write(path, n=3)
    _set_lines(path, _lines(path)[1:])
    assert verify(path).first_bad_line == 1
    assert "prev is not 64 zeros" in verify(path).reason


def test_swapping_two_lines_is_caught(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write(path, n=5)
    lines = _lines(path)
    lines[1], lines[3] = lines[3], lines[1]
    _set_lines(path, lines)
    report = verify(path)
    assert not report.ok and report.first_bad_line == 2 and "entry removed or reordered" in report.reason


def test_appended_forgery_with_wrong_prev_is_caught(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write(path, n=4)
    forged = {"seq": 5, "time": "2025-01-01T00:00:00.000Z", "actor": "coordinator", "event": "update_received",
              "round": 9, "sha256": sha256_hex(b"never sent"), "prev": sha256_hex(b"guess")}
    forged["hash"] = _spec_hash(forged)  # internally consistent, but not linked to line 4
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(forged) + "\n")
    assert verify(path) == (False, 4, 5, "prev does not match line 4's hash (entry removed or reordered)")


def test_seq_gap_with_a_consistent_hash_is_caught(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write(path, n=4)
    last = json.loads(_lines(path)[-1])
    entry = {"seq": 7, "time": "2025-01-01T00:00:00.000Z", "actor": "x", "event": "e", "prev": last["hash"]}
    entry["hash"] = _spec_hash(entry)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    assert verify(path) == (False, 4, 5, "seq 7, expected 5")


@pytest.mark.parametrize(
    "line, reason",
    [
        ("{not json\n", "not valid JSON"),
        ("[1, 2]\n", "not a JSON object"),
        ('{"seq": 2, "time": "t", "actor": "a", "event": "e"}\n', "missing key(s): prev, hash"),
        ("\n", "not valid JSON"),
    ],
)
def test_malformed_line_is_reported(tmp_path, line, reason):
    path = tmp_path / "audit.jsonl"
    _write(path, n=3)
    lines = _lines(path)
    lines[1] = line
    _set_lines(path, lines)
    assert verify(path) == (False, 1, 2, reason)


def test_duplicate_keys_are_refused(tmp_path):
    """A duplicate key would show a human one value while the hash covers another."""
    path = tmp_path / "audit.jsonl"
    _write(path, n=2)
    lines = _lines(path)
    lines[1] = lines[1].replace('"round":', '"round": 99, "round":', 1)
    _set_lines(path, lines)
    report = verify(path)
    assert report.first_bad_line == 2 and "duplicate key 'round'" in report.reason


def test_truncated_last_line_refuses_to_open_and_fails_verify(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write(path, n=4)
    data = path.read_bytes()
    path.write_bytes(data[:-30])  # crash or truncation mid-line
    with pytest.raises(AuditError, match=r"audit\.jsonl: line 4: truncated entry.*refusing to append"):
        AuditLog(path, "coordinator")
    assert path.read_bytes() == data[:-30]  # nothing appended
    report = verify(path)
    assert report.first_bad_line == 4 and report.entries == 3 and "truncated" in report.reason


def test_edited_last_line_refuses_to_open(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write(path, n=3)
    _set_lines(path, _lines(path)[:-1] + [_lines(path)[-1].replace("Cleveland", "Hungary")])
    with pytest.raises(AuditError, match="line 3: hash mismatch"):
        AuditLog(path, "coordinator")


def test_concurrent_records_form_one_valid_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, "coordinator") as log:
        def work(t):
            for i in range(50):
                log.record("update_received", thread=t, i=i)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert verify(path) == (True, 400, None, "chain intact")
    entries = [json.loads(line) for line in _lines(path)]
    assert sorted(e["seq"] for e in entries) == list(range(1, 401))
    assert {(e["thread"], e["i"]) for e in entries} == {(t, i) for t in range(8) for i in range(50)}


@pytest.mark.parametrize("name", ["seq", "time", "actor", "prev", "hash"])
def test_reserved_field_names_are_refused(tmp_path, name):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, "coordinator") as log:
        with pytest.raises(ValueError, match=f"{name}.*reserved"):
            log.record("connect", **{name: "x"})
    assert path.read_bytes() == b""


def test_unserialisable_fields_are_refused_before_writing(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, "coordinator") as log:
        with pytest.raises(TypeError, match="sha256_hex"):
            log.record("update_sent", update=b"raw bytes")
        with pytest.raises(TypeError):
            log.record("update_sent", norm=float("nan"))
        log.record("ok")
    assert verify(path) == (True, 1, None, "chain intact")


def test_closed_log_refuses_records_and_second_writer_is_refused(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, "coordinator")
    with pytest.raises(AuditError, match="already open"):
        AuditLog(path, "coordinator")  # two writers would fork the chain
    log.close()
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.record("late")
    AuditLog(path, "coordinator").close()  # lock released on close


def test_verify_main_exit_codes_and_output(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    _write(path, n=3)
    last_hash = json.loads(_lines(path)[-1])["hash"]
    assert verify_main(path) == 0
    assert capsys.readouterr().out == f"OK: 3 entries, chain intact, last hash {last_hash}\n"

    lines = _lines(path)
    lines[2] = lines[2].replace("Cleveland", "Hungary")
    _set_lines(path, lines)
    assert verify_main(path) == 1
    assert capsys.readouterr().out == "BROKEN at line 3: hash mismatch (entry edited)\n"

    assert verify_main(tmp_path / "missing.jsonl") == 1
    out = capsys.readouterr().out
    assert out.startswith("ERROR: cannot read ") and "missing.jsonl" in out
    report = verify(tmp_path / "missing.jsonl")
    assert not report.ok and report.first_bad_line is None


def test_only_durable_entries_fsync_and_the_chain_is_the_same(tmp_path, monkeypatch):
    import os

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    log = AuditLog(tmp_path / "a.jsonl", actor="coordinator")
    log.record("task_sent", durable=False, site="A")
    log.record("update_accepted", durable=False, site="A")
    assert synced == []
    log.record("round_closed", round=0)  # durable by default: it makes the two before durable too
    assert len(synced) == 1
    log.close()
    report = verify(tmp_path / "a.jsonl")
    assert report.ok and report.entries == 3


# ---------------------------------------------------------------------- signed entries and cross-party heads (issue 15)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two parties' ECDSA P-256 keys and certificates, as the federation's provisioning makes them."""
    from nordfl.runtime import tls

    root = tls.provision(tmp_path_factory.mktemp("fed") / "federation", ["Oslo"])
    return {"site": (root / "sites" / "Oslo" / "key.pem", root / "sites" / "Oslo" / "cert.pem"),
            "coordinator": (root / "coordinator" / "key.pem", root / "coordinator" / "cert.pem")}


def _exchange(tmp_path, keys, rounds=3):
    """A site and a coordinator log as the runtime writes them: the site's head in each update, the coordinator's in each reply."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    site = AuditLog(tmp_path / "site.jsonl", "site:Oslo", signing_key=keys["site"][0])
    coordinator = AuditLog(tmp_path / "coordinator.jsonl", "coordinator", signing_key=keys["coordinator"][0])
    coordinator.record("start")
    for r in range(rounds):
        sent = site.record("update_sent", round=r, sha256="ab" * 32)
        accepted = coordinator.record("update_accepted", site="Oslo", round=r, site_audit_head=sent["hash"])
        site.record("update_result", round=r, accepted=True, coordinator_audit_head=accepted["hash"])
        coordinator.record("round_closed", round=r)
    site.close()
    coordinator.close()
    return tmp_path / "site.jsonl", tmp_path / "coordinator.jsonl"


def test_signed_logs_verify_and_agree(tmp_path, keys):
    site, coordinator = _exchange(tmp_path, keys)
    assert verify(site, keys["site"][1]).ok and verify(coordinator, keys["coordinator"][1]).ok
    assert cross_check(site, coordinator) == []
    # Each log verifies only with its own writer's certificate.
    assert not verify(site, keys["coordinator"][1]).ok


def test_cut_tail_of_either_log_is_found_given_both(tmp_path, keys):
    site, coordinator = _exchange(tmp_path, keys)
    lines = _lines(site)
    _set_lines(site, lines[:-3])  # the last round's update_sent, its result and nothing after
    assert verify(site).ok  # alone, a shorter chain is still a chain
    problems = cross_check(site, coordinator)
    assert len(problems) == 1 and "site log was cut or rewritten" in problems[0]

    site, coordinator = _exchange(tmp_path / "b", keys)
    _set_lines(coordinator, _lines(coordinator)[:-2])
    assert verify(coordinator).ok
    assert any("coordinator log was cut or rewritten" in p for p in cross_check(site, coordinator))


def test_rehashed_rewrite_and_appended_forgery_fail_signature_checks(tmp_path, keys):
    site, coordinator = _exchange(tmp_path, keys)
    # Rewrite an entry and recompute every hash after it: the unkeyed chain is intact again...
    entries = [json.loads(line) for line in _lines(site)]
    entries[0]["sha256"] = "cd" * 32
    prev = GENESIS
    for e in entries:
        e["prev"] = prev
        body = {k: v for k, v in e.items() if k not in ("hash", "sig")}
        e["hash"] = _spec_hash(body)
        prev = e["hash"]
    _set_lines(site, [json.dumps(e) + "\n" for e in entries])
    assert verify(site).ok
    # ...but the signatures no longer match, and the coordinator's record of the heads disagrees.
    report = verify(site, keys["site"][1])
    assert not report.ok and report.first_bad_line == 1 and "signature" in report.reason
    assert cross_check(site, coordinator)

    site, coordinator = _exchange(tmp_path / "c", keys)
    with AuditLog(site, "site:Oslo") as forger:  # without the site's key
        forger.record("update_sent", round=9, sha256="ef" * 32)
    report = verify(site, keys["site"][1])
    assert not report.ok and report.first_bad_line == 7 and "unsigned" in report.reason


def test_verify_main_with_certificate_and_peer(tmp_path, keys, capsys):
    site, coordinator = _exchange(tmp_path, keys)
    assert verify_main(site, keys["site"][1], peer=coordinator) == 0
    assert "every entry signed; agrees with" in capsys.readouterr().out
    _set_lines(site, _lines(site)[:-3])
    assert verify_main(coordinator, keys["coordinator"][1], peer=site) == 1
    assert "MISMATCH" in capsys.readouterr().out
    (tmp_path / "empty.jsonl").touch()
    assert verify_main(tmp_path / "empty.jsonl") == 1
    assert "is empty" in capsys.readouterr().out
