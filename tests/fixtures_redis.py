"""A real redis-server for cache tests: started on a free 127.0.0.1 port, stopped after.

`redis_server` (session) serves most tests; each test gets its own namespace
(`cache_namespace`) so they never see each other's keys. Failure tests take
`redis_process`, a private server they may kill, pause (SIGSTOP) or resume (SIGCONT).
`redis_cluster` is a single-node Redis Cluster owning all 16384 slots.
Nothing listens beyond 127.0.0.1, nothing is persisted (--save '' --appendonly no).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A free port p whose cluster bus port p + 10000 is free and valid too."""
    import random

    for _ in range(200):
        port = random.randint(20000, 55000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _ping(port: int | None = None, unix_socket: str | None = None, timeout: float = 0.2, ca: str | None = None) -> bool:
    try:
        if unix_socket:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(unix_socket)
        else:
            s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if ca:
            import ssl

            s = ssl.create_default_context(cafile=ca).wrap_socket(s, server_hostname="127.0.0.1")
        with s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _command(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """Send one command in RESP and return the raw reply (fixtures only)."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        return s.recv(65536)


class RedisServer:
    """One redis-server child process."""

    def __init__(self, workdir: Path, *, unix_socket: bool = False, cluster: bool = False, tls: bool = False) -> None:
        if REDIS_SERVER is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_cluster_port() if cluster else free_port()
        self.unix_socket = str(self.workdir / "redis.sock") if unix_socket else None
        self.cluster = cluster
        self.ca: str | None = self._make_certificate() if tls else None
        self.proc: subprocess.Popen | None = None

    def _make_certificate(self) -> str:
        """A self-signed certificate for 127.0.0.1 (TLS-only server, rediss:// clients trust it as CA)."""
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("openssl is not installed; cannot make a certificate for the TLS server")
        cert, key = self.workdir / "cert.pem", self.workdir / "key.pem"
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
             "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True,
        )
        return str(cert)

    @property
    def url(self) -> str:
        """redis:// URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """unix:// URL of this server's socket."""
        assert self.unix_socket, "server started without a unix socket"
        return f"unix://{self.unix_socket}"

    @property
    def tls_url(self) -> str:
        """rediss:// URL of this TLS-only server, trusting its self-signed certificate."""
        assert self.ca, "server started without TLS"
        return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca}"

    @property
    def cluster_url(self) -> str:
        """redis+cluster:// URL of this server (cluster mode only)."""
        return f"redis+cluster://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        """Start the server and wait until it answers PING."""
        args = [
            REDIS_SERVER,
            "--bind", "127.0.0.1",
            *(["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.ca,
               "--tls-key-file", str(self.workdir / "key.pem"), "--tls-ca-cert-file", self.ca,
               "--tls-auth-clients", "no"] if self.ca else ["--port", str(self.port)]),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.workdir / "redis.log"),  # kept with pytest's temporary folders
            "--daemonize", "no",
        ]
        if self.unix_socket:
            args += ["--unixsocket", self.unix_socket, "--unixsocketperm", "700"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.workdir / f"nodes-{self.port}.conf")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not _ping(self.port, ca=self.ca):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on 127.0.0.1:{self.port}")
            time.sleep(0.02)
        if self.cluster:
            self._claim_all_slots(deadline)
        return self

    def _claim_all_slots(self, deadline: float) -> None:
        # A one-node cluster: this node serves every slot.
        _command(self.port, "CLUSTER", "ADDSLOTSRANGE", "0", "16383")
        while b"cluster_state:ok" not in _command(self.port, "CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                raise RuntimeError("single-node cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (SIGCONT first, in case a test left it paused)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.terminate()
                self.proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the server and wait until it is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, but nothing answers."""
        assert self.proc is not None and self.proc.poll() is None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self) -> "RedisServer":
        """Start again on the same port (after kill())."""
        self.stop()
        return self.start()

    def command(self, *args: str) -> bytes:
        """Raw RESP reply of one command (for assertions that must not go through the cache code)."""
        return _command(self.port, *args)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A session-wide redis-server on 127.0.0.1 (TCP and a unix socket)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), unix_socket=True).start()
    yield server
    server.stop()


@pytest.fixture
def redis_process(tmp_path_factory):
    """A private redis-server that the test may kill, pause and resume."""
    server = RedisServer(tmp_path_factory.mktemp("redis-private")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_tls(tmp_path_factory):
    """A TLS-only redis-server with a self-signed certificate for 127.0.0.1."""
    server = RedisServer(tmp_path_factory.mktemp("redis-tls"), tls=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A single-node Redis Cluster owning every slot."""
    server = RedisServer(tmp_path_factory.mktemp("redis-cluster"), cluster=True).start()
    yield server
    server.stop()


@pytest.fixture
def cache_namespace() -> str:
    """A namespace no other test uses."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def dead_redis_url() -> str:
    """A redis:// URL where no server listens."""
    return f"redis://127.0.0.1:{free_port()}/0"


# ---------------------------------------------------------------- tiny models for cache tests


@dataclass
class CacheModels:
    """Checkpoints (float64 Llama, with the tiny tokenizer) for end-to-end cache tests."""

    target: Path  # the model most tests use
    other: Path  # same architecture and tokenizer, different weights and path
    draft: Path  # a smaller model to serve as draft


@pytest.fixture(scope="session")
def cache_models(tmp_path_factory, tiny_tokenizer) -> CacheModels:
    """Tiny Llama checkpoints saved with save_pretrained (load them with from_pretrained)."""
    import torch
    from fixtures_models import make_model, save

    root = tmp_path_factory.mktemp("cache-models")
    vocab = len(tiny_tokenizer)
    paths = {}
    for name, seed, layers in (("target", 0, 2), ("other", 1, 2), ("draft", 2, 1)):
        model = make_model("llama", vocab, seed=seed, layers=layers)
        with torch.no_grad():  # sharper next-token distributions: sampled repeats agree more often
            model.lm_head.weight.mul_(4.0)
        paths[name] = save(model, tiny_tokenizer, root / name)
    return CacheModels(**paths)


def timer_lateness(rounds: int = 3, wait_s: float = 0.02) -> float:
    """How late a thread's timed wait returns right now (the watchdog waits the same way):
    about 0.1 ms on a healthy machine, tens of ms on one that loses most of its CPU to steal."""
    worst = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        threading.Event().wait(wait_s)
        worst = max(worst, time.perf_counter() - start - wait_s)
    return worst


class BackendCalls:
    """Counts the backend operations a store runs (each one is network for Redis):
    `with BackendCalls(store) as calls: ...` then `calls.ops`.

    Timing-free evidence that a path skipped the server (an open breaker): a wall-clock
    bound on "no network" fails on a starved machine."""

    def __init__(self, store) -> None:
        self.store = store
        self.ops: list[str] = []
        self._lock = threading.Lock()

    def __enter__(self) -> "BackendCalls":
        real, calls = self.store.backend, self

        class Counting:
            def __getattr__(self, name):
                attr = getattr(real, name)
                if not callable(attr):
                    return attr

                def counted(*args, **kwargs):
                    with calls._lock:
                        calls.ops.append(name)
                    return attr(*args, **kwargs)

                return counted

        self._real = real
        self.store.backend = Counting()
        return self

    def __exit__(self, *exc) -> None:
        self.store.backend = self._real
