"""Network faults for process-level tests: a bounded userspace TCP fault proxy and Linux network namespaces.

The kernel these tests run on has no ``netem``, so latency, loss and partitions are made in userspace by
:class:`FaultProxy`; a bandwidth cap can be made either by the proxy (token bucket) or by the kernel's ``tbf``
qdisc on a namespace's link (:func:`tbf`).

Layout made by :class:`Topology`: a *hub* namespace with a bridge at ``10.77.0.1/24`` (the coordinator and the
proxies live there), and one namespace per site, joined to the bridge by a veth pair, at ``10.77.0.(10+i)``.
Nothing is created in the caller's namespace but the namespace handles; everything is removed on exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from typing import Optional

CLONE_NEWNET = 0x40000000
HUB_ADDRESS = "10.77.0.1"
SUBNET = 24
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be used here (not root, no ``ip``, or ``ip netns add`` failed)."""


def _ip(*args: str, ns: Optional[str] = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip"] + (["netns", "exec", ns, "ip"] if ns else []) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def _tc(*args: str, ns: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True, check=True, timeout=30)


def netns_unavailable_reason() -> Optional[str]:
    """Why namespaces can't be used here, or None when they can (probes with a throwaway namespace)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` binary (iproute2)"
    probe = f"nfl-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@contextlib.contextmanager
def netns(name: str):
    """A fresh network namespace ``name`` with ``lo`` up; deleted (with its links) on exit."""
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        raise NetnsUnavailable(f"ip netns add {name}: {r.stderr.strip()}")
    try:
        _ip("link", "set", "lo", "up", ns=name)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def enter_netns(name: str) -> None:
    """Moves the *calling thread* into namespace ``name`` (sockets it creates from now on live there)."""
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def tbf(ns: str, dev: str, rate: str = "10mbit", burst: str = "32kbit", latency: str = "400ms") -> None:
    """Caps ``dev``'s egress in ``ns`` with the kernel's token bucket filter."""
    _tc("qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", burst, "latency", latency, ns=ns)


class Topology:
    """A hub namespace with a bridge, and ``n`` site namespaces each linked to it by a veth pair.

    ``site_ns[i]`` and ``site_address[i]``; the hub side of site i's link is ``hub_dev[i]`` and the site side
    ``site_dev[i]`` (for :func:`tbf`). Use as a context manager: everything is deleted on exit, also on error.
    """

    def __init__(self, n: int, tag: Optional[str] = None):
        self.tag = tag or f"{os.getpid() % 100000}"
        self.hub = f"nfl-hub-{self.tag}"
        self.site_ns = [f"nfl-s{i}-{self.tag}" for i in range(n)]
        self.site_address = [f"10.77.0.{10 + i}" for i in range(n)]
        self.hub_dev = [f"vh{i}" for i in range(n)]
        self.site_dev = [f"vs{i}" for i in range(n)]
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "Topology":
        try:
            self._stack.enter_context(netns(self.hub))
            _ip("link", "add", "br0", "type", "bridge", ns=self.hub)
            _ip("addr", "add", f"{HUB_ADDRESS}/{SUBNET}", "dev", "br0", ns=self.hub)
            _ip("link", "set", "br0", "up", ns=self.hub)
            for i, ns in enumerate(self.site_ns):
                self._stack.enter_context(netns(ns))
                # Both ends created straight inside their namespaces: no name ever appears in the caller's.
                subprocess.run(["ip", "link", "add", "name", self.hub_dev[i], "netns", self.hub, "type", "veth",
                                "peer", "name", self.site_dev[i], "netns", ns], capture_output=True, text=True,
                               check=True, timeout=30)
                _ip("link", "set", self.hub_dev[i], "master", "br0", ns=self.hub)
                _ip("link", "set", self.hub_dev[i], "up", ns=self.hub)
                _ip("addr", "add", f"{self.site_address[i]}/{SUBNET}", "dev", self.site_dev[i], ns=ns)
                _ip("link", "set", self.site_dev[i], "up", ns=ns)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def cap(self, i: int, rate: str = "10mbit") -> None:
        """``tbf`` on both ends of site i's link (its uploads and its downloads)."""
        tbf(self.site_ns[i], self.site_dev[i], rate)
        tbf(self.hub, self.hub_dev[i], rate)


class FaultProxy:
    """A threaded TCP proxy from ``listen`` to ``target`` with faults that can be changed while it runs.

    Faults (thread-safe setters, applied per forwarded chunk, both directions):
      * ``latency_ms``: one-way delay added to every chunk;
      * ``loss``: TCP never loses data, so "loss" is emulated as a retransmission-like stall: each chunk is
        held an extra ``loss_delay_ms`` (200 ms) with probability ``loss`` (e.g. 0.01 for "1% loss");
      * ``bandwidth``: bytes per second per direction per connection, a token bucket (None: uncapped);
      * :meth:`partition` closes every connection and refuses (accepts and closes) new ones until :meth:`heal`;
      * :meth:`reset_all` closes every open connection once.
    Bounded: at most ``max_connections`` at once (more are closed on accept) and reads of at most ``chunk``
    bytes, each forwarded before the next read, so a connection buffers at most one chunk per direction.
    ``netns``: the namespace the proxy's sockets (listening and outgoing) are made in (None: the caller's).
    """

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], *, netns: Optional[str] = None,
                 max_connections: int = 64, chunk: int = 65536, seed: int = 0):
        self.target, self.netns = target, netns
        self.max_connections, self.chunk = max_connections, chunk
        self._lock = threading.Lock()
        self._latency = 0.0
        self._loss = 0.0
        self._loss_delay = 0.2
        self._bandwidth: Optional[float] = None
        self._partitioned = False
        self._conns: set[socket.socket] = set()  # every open socket, both ends, for partition and reset
        self._clients: set[socket.socket] = set()  # the accepted ends: one per connection, for the cap
        self._random = random.Random(seed)
        self._closed = threading.Event()
        self.stats = {"accepted": 0, "refused": 0, "bytes": 0, "stalls": 0}
        ready = threading.Event()
        failure: list = []

        def start():
            try:
                if netns:
                    enter_netns(netns)
                self._server = socket.create_server(listen, reuse_port=False)
                self._server.settimeout(0.2)
                self.address = self._server.getsockname()[:2]
            except BaseException as e:  # reported to the constructor's caller
                failure.append(e)
                ready.set()
                return
            ready.set()
            self._accept_loop()

        self._thread = threading.Thread(target=start, daemon=True, name=f"faultproxy-{listen}")
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]

    # --- faults -----------------------------------------------------------------------------------------
    def set_faults(self, *, latency_ms: Optional[float] = None, loss: Optional[float] = None,
                   loss_delay_ms: Optional[float] = None, bandwidth: Optional[float] = -1) -> None:
        with self._lock:
            if latency_ms is not None:
                self._latency = max(0.0, latency_ms) / 1000
            if loss is not None:
                self._loss = min(max(0.0, loss), 1.0)
            if loss_delay_ms is not None:
                self._loss_delay = max(0.0, loss_delay_ms) / 1000
            if bandwidth != -1:
                self._bandwidth = None if bandwidth is None else float(bandwidth)

    def partition(self) -> None:
        with self._lock:
            self._partitioned = True
        self.reset_all()

    def heal(self) -> None:
        with self._lock:
            self._partitioned = False

    def reset_all(self) -> None:
        with self._lock:
            conns = list(self._conns)
        self._drop(*conns)

    def close(self) -> None:
        self._closed.set()
        self.reset_all()
        self._thread.join(5)
        _close(self._server)

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- forwarding -------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                refuse = self._partitioned or len(self._clients) >= self.max_connections
                if not refuse:
                    self._conns.add(client)
                    self._clients.add(client)
            if refuse:
                self.stats["refused"] += 1
                _close(client)
                continue
            self.stats["accepted"] += 1
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            if self.netns:
                enter_netns(self.netns)  # this thread's outgoing socket in the proxy's namespace
            upstream = socket.create_connection(self.target, timeout=10)
            upstream.settimeout(None)
        except OSError:
            self._drop(client)
            return
        with self._lock:
            if client not in self._conns:  # reset while connecting
                _close(upstream)
                return
            self._conns.add(upstream)
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    def _delay(self, size: int, bucket: list) -> float:
        with self._lock:
            delay = self._latency
            if self._loss and self._random.random() < self._loss:
                delay += self._loss_delay
                self.stats["stalls"] += 1
            rate = self._bandwidth
        if rate:
            now = time.monotonic()
            # bucket = [tokens, last]; at most one second of burst
            bucket[0] = min(rate, bucket[0] + (now - bucket[1]) * rate) - size
            bucket[1] = now
            if bucket[0] < 0:
                delay += -bucket[0] / rate
        return delay

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        bucket = [0.0, time.monotonic()]
        try:
            while True:
                data = src.recv(self.chunk)
                if not data:
                    break
                delay = self._delay(len(data), bucket)
                if delay:
                    time.sleep(delay)  # held, in order: latency of a chunk delays the ones behind it, as on a wire
                dst.sendall(data)
                self.stats["bytes"] += len(data)
        except OSError:
            pass
        finally:
            self._drop(src, dst)

    def _drop(self, *socks: socket.socket) -> None:
        with self._lock:
            for s in socks:
                self._conns.discard(s)
                self._clients.discard(s)
        for s in socks:
            _close(s)


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()
