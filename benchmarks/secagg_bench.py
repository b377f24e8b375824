"""Secure aggregation's compute cost: 4 sites x 1M float32 parameters, in one process, no transport.

    python -m benchmarks.secagg_bench                  # 4 sites, 1M parameters, 3 repeats
    python -m benchmarks.secagg_bench --sites 8 --params 100000

Times each step of ``nordfl.runtime.secagg`` (median over repeats): key set-up (steps 0-1, all
sites), masking (step 2, per site), and the coordinator's unmasking (``result``) with no dropout
and with one site dropped before submitting (its pairwise masks must be recomputed).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from nordfl.runtime.secagg import SecAggClient, SecAggConfig, SecAggServer


def one_round(cfg: SecAggConfig, xs: dict[int, np.ndarray], dropped: tuple[int, ...]) -> dict[str, float]:
    d = len(xs[1])
    times = {}
    t0 = time.perf_counter()
    server = SecAggServer(cfg, "bench", 0, length=d)
    clients = {i: SecAggClient(cfg, "bench", 0, i) for i in xs}
    for c in clients.values():
        server.add_advertise(c.advertise())
    roster = server.roster()
    for c in clients.values():
        server.add_shares(c.share_keys(roster))
    forwarded = server.forward_shares()
    times["setup (steps 0-1, all sites)"] = time.perf_counter() - t0
    masking = []
    for i, c in clients.items():
        if i not in dropped:
            t0 = time.perf_counter()
            msg = c.masked_input(xs[i], forwarded[i])
            masking.append(time.perf_counter() - t0)
            server.add_masked_input(msg)
    times["masking (step 2, per site)"] = statistics.median(masking)
    t0 = time.perf_counter()
    data = msg.to_bytes()
    type(msg).from_bytes(data)
    times["MaskedInput to_bytes+from_bytes"] = time.perf_counter() - t0
    times["bytes"] = len(data)
    t0 = time.perf_counter()
    request = server.unmask_request()
    for i in request.survivors:
        server.add_unmask_shares(clients[i].unmask(request))
    result = server.result()
    times["unmasking (step 3 + result)"] = time.perf_counter() - t0
    plain = sum(np.clip(xs[i].astype(np.float64), -cfg.clip_range, cfg.clip_range) for i in result.sites)
    assert np.abs(result.total - plain).max() <= result.error_bound
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bits", type=int, default=24)
    args = parser.parse_args()
    cfg = SecAggConfig(num_sites=args.sites, threshold=args.sites // 2 + 1, clip_range=1.0, bits=args.bits)
    rng = np.random.default_rng(0)
    xs = {i: rng.uniform(-1, 1, args.params).astype(np.float32) for i in range(1, args.sites + 1)}
    print(f"{args.sites} sites x {args.params:,} parameters, bits={cfg.bits}, field 2^{cfg.field_bits}, "
          f"bound {cfg.error_bound(args.sites):.2e} per coordinate")
    for dropped in ((), (args.sites,)):
        runs = [one_round(cfg, xs, dropped) for _ in range(args.repeats)]
        label = f"site {dropped[0]} dropped before submitting" if dropped else "no dropout"
        print(f"  {label}:")
        print(f"    {'MaskedInput on the wire':32s} {runs[0].pop('bytes') / 1e6:8.1f} MB")
        for key in runs[0]:
            print(f"    {key:32s} {1000 * statistics.median(r[key] for r in runs):8.1f} ms")


if __name__ == "__main__":
    main()
