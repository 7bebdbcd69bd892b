"""A second, private RabbitMQ node for the faults that must not touch the shared broker.

``rf-chaos@localhost`` listens on 127.0.0.1:5673 (AMQP) and 25673 (Erlang distribution), keeps
its data and logs in a temporary directory and reads its own ``rabbitmq.conf``: the tests may
stop and start it, raise a memory alarm on it, and it runs with ``consumer_timeout = 5000``
(checked every second) so that the consumer-timeout fault takes seconds, not half an hour.
The shared node ``rabbit@localhost`` on 5672 is never stopped nor reconfigured.

One pytest session owns the node at a time (an exclusive ``flock`` on a lock file); a node of
that name still running when the lock is taken is a leftover of a killed session and is
stopped first.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tests.support.broker import Rabbit
from tests.support.network import answers

NODE = "rf-chaos@localhost"
AMQP_PORT = 5673
TLS_PORT = 5674
DIST_PORT = 25673
CONSUMER_TIMEOUT_MS = 5000
LOCK_FILE = Path(tempfile.gettempdir()) / "rf-chaos.lock"
START_TIMEOUT = 90.0

CONFIG = f"""\
listeners.tcp.default = 127.0.0.1:{AMQP_PORT}
loopback_users.guest = true
consumer_timeout = {CONSUMER_TIMEOUT_MS}
log.file.level = info
"""
# RabbitMQ checks consumer_timeout on each channel tick, every 60 s by default: a 5 s timeout
# would fire after up to a minute. A 1 s tick makes it fire within a second of expiring.
ADVANCED_CONFIG = "[{rabbit, [{channel_tick_interval, 1000}]}].\n"
# An AMQPS listener with a certificate for "localhost" signed by a CA made for the session;
# client certificates are verified when presented (verify_peer) but not required.
TLS_CONFIG = """\
listeners.ssl.default = 127.0.0.1:{port}
ssl_options.cacertfile = {tls}/ca.pem
ssl_options.certfile = {tls}/server.pem
ssl_options.keyfile = {tls}/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
"""


@dataclass(frozen=True)
class TlsFiles:
    """The session's self-signed CA, and a server and a client certificate it signed."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, check=True, timeout=60)


def make_tls_files(directory: Path) -> TlsFiles:
    """A CA, a server certificate for DNS:localhost only (so 127.0.0.1 does not match) and a
    client certificate, with the openssl command line."""
    directory.mkdir()
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        "/CN=rabbitflow test CA", "-keyout", "ca.key", "-out", "ca.pem", cwd=directory,
    )  # fmt: skip
    for name, extension in (
        ("server", "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (directory / f"{name}.ext").write_text(extension + "\n")
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=rabbitflow-{name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=directory,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
            cwd=directory,
        )  # fmt: skip
    for key in directory.glob("*.key"):
        key.chmod(0o644)  # the node runs as the rabbitmq user; these keys guard nothing real
    return TlsFiles(directory)


class ChaosNodeUnavailable(Exception):
    """The second node could not be started; the message says why."""


class ChaosNode:
    """Start, stop, pause and alarm the private node; ``rabbit`` is its test handle."""

    def __init__(self) -> None:
        self.ctl_path = shutil.which("rabbitmqctl") or "rabbitmqctl"
        self.server_path = shutil.which("rabbitmq-server")
        self.base: Path | None = None
        self.tls: TlsFiles | None = None
        self.tls_error = ""
        self.rabbit = Rabbit.at(
            f"amqp://guest:guest@127.0.0.1:{AMQP_PORT}/", [self.ctl_path, "-n", NODE]
        )
        self._lock: IO[str] | None = None

    # -- rabbitmqctl ------------------------------------------------------------------------

    def ctl(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        result = subprocess.run(
            [self.ctl_path, "-n", NODE, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl -n {NODE} {' '.join(args)} failed: "
                f"{(result.stderr or result.stdout).strip()[:500]}"
            )
        return result.stdout

    def running(self) -> bool:
        result = subprocess.run(
            [self.ctl_path, "-n", NODE, "ping"], capture_output=True, timeout=30, check=False
        )
        return result.returncode == 0

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Take the lock, clear a leftover node, write the config and boot the node."""
        if self.server_path is None:
            raise ChaosNodeUnavailable("rabbitmq-server is not installed")
        self._take_lock()
        if self.running():
            self.ctl("stop", check=False)  # a leftover of a killed session of this suite
        if answers("127.0.0.1", AMQP_PORT):
            raise ChaosNodeUnavailable(f"127.0.0.1:{AMQP_PORT} is taken by another process")
        self.base = Path(tempfile.mkdtemp(prefix="rf-chaos-"))
        self._write_config(self.base)
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": NODE,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(AMQP_PORT),
            "RABBITMQ_DIST_PORT": str(DIST_PORT),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.base / "rf-chaos.pid"),
        }
        result = subprocess.run(
            [self.server_path, "-detached"],
            cwd=self.base,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise ChaosNodeUnavailable(
                f"rabbitmq-server -detached failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[:500]}"
            )
        self._await_startup()

    def _take_lock(self) -> None:
        self._lock = LOCK_FILE.open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise ChaosNodeUnavailable(
                f"another test session holds {LOCK_FILE} and runs {NODE}"
            ) from None

    def _write_config(self, base: Path) -> None:
        (base / "mnesia").mkdir()
        (base / "log").mkdir()
        config = CONFIG
        try:
            self.tls = make_tls_files(base / "tls")
            config += TLS_CONFIG.format(port=TLS_PORT, tls=self.tls.directory)
        except (OSError, subprocess.SubprocessError) as exc:
            self.tls_error = f"cannot make test certificates with openssl: {exc}"
        (base / "rabbitmq.conf").write_text(config)
        (base / "advanced.config").write_text(ADVANCED_CONFIG)
        (base / "enabled_plugins").write_text("[].\n")
        # The rabbitmq-server script drops to the rabbitmq user when started as root.
        if os.geteuid() == 0:
            with contextlib.suppress(KeyError):
                user = pwd.getpwnam("rabbitmq")
                for path in [base, *base.rglob("*")]:
                    os.chown(path, user.pw_uid, user.pw_gid)
        base.chmod(0o755)

    def _await_startup(self) -> None:
        # await_startup fails at once while the node is not yet registered with epmd.
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.running():
                self.ctl("await_startup", "--timeout", str(int(START_TIMEOUT)))
                if answers("127.0.0.1", AMQP_PORT):
                    return
            time.sleep(0.5)
        raise ChaosNodeUnavailable(
            f"{NODE} did not start within {START_TIMEOUT:.0f} s; see {self.log_file()}"
        )

    def log_file(self) -> Path | None:
        return self.base / "log" / f"{NODE}.log" if self.base else None

    def stop(self) -> None:
        """Stop the node, remove its files and release the lock."""
        try:
            if self.running():
                self.ctl("stop", check=False, timeout=120)
        finally:
            if self.base is not None:
                shutil.rmtree(self.base, ignore_errors=True)
                self.base = None
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    # -- faults -----------------------------------------------------------------------------

    def stop_app(self) -> None:
        """Stop the RabbitMQ application (connections drop, the port closes); the VM stays."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.ctl("await_startup")

    def set_memory_watermark(self, fraction: float) -> None:
        # A tiny fraction raises the memory alarm at once: publishing connections are blocked.
        self.ctl("set_vm_memory_high_watermark", f"{fraction:.10f}".rstrip("0"))

    def alarms(self) -> str:
        return self.ctl("eval", "rabbit_alarm:get_alarms().")
