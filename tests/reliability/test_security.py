"""TLS: ``amqps://`` to the chaos node's listener (127.0.0.1:5674), whose certificate names
``localhost`` only and is signed by a CA made for the test session.

The CA file and the client certificate go in the URL's query, as aio-pika reads them:
``amqps://user:pass@localhost:5674/vhost?cafile=ca.pem&certfile=client.pem&keyfile=client.key``.
Verification of the broker's certificate and of its host name is on; a broker that fails it
is refused with the reason, never connected to.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, urlencode

import pytest

from tests.reliability.chaos_node import TLS_PORT, ChaosNode, TlsFiles
from tests.reliability.checker import Checker
from tests.support.processes import run_cli

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.chaos, pytest.mark.nodes]


@pytest.fixture
def tls(chaos_node: ChaosNode) -> TlsFiles:
    if chaos_node.tls is None:
        pytest.skip(f"no TLS listener on the chaos node: {chaos_node.tls_error}")
    return chaos_node.tls


def amqps(vhost: str, host: str = "localhost", **query: Path) -> str:
    url = f"amqps://guest:guest@{host}:{TLS_PORT}/{quote(vhost, safe='')}"
    return f"{url}?{urlencode({k: str(v) for k, v in query.items()})}" if query else url


def tls_connections(checker: Checker) -> list[list[str]]:
    """``[ssl, peer_cert_subject]`` of the worker's connections on the checker's vhost."""
    out = checker.rabbit.ctl(
        "list_connections", "--no-table-headers", "--quiet", "vhost", "ssl", "peer_cert_subject"
    )
    rows = [line.split("\t") for line in out.splitlines() if line.strip()]
    return [row[1:] for row in rows if row[0] == checker.vhost]


def test_worker_over_tls_with_the_ca_file(chaos_checker: Checker, tls: TlsFiles) -> None:
    # Given a worker connected with amqps://, verifying the broker against the test CA
    checker = chaos_checker
    checker.write_topology()
    url = amqps(checker.vhost, cafile=tls.ca)
    worker = checker.start_worker(url=url)

    # When messages arrive (published over plain AMQP), Then they are processed over TLS
    checker.feed(300, rate=300)
    checker.records.wait_for("done", 300, timeout=20)
    assert ["true", ""] in tls_connections(checker)
    assert "guest:guest" not in worker.output()
    checker.drain(url=url)
    checker.report("amqps with a CA file", 0, duplicate_bound=0).check()


def test_worker_presents_a_client_certificate(chaos_checker: Checker, tls: TlsFiles) -> None:
    checker = chaos_checker
    checker.write_topology()
    url = amqps(checker.vhost, cafile=tls.ca, certfile=tls.client_cert, keyfile=tls.client_key)
    checker.start_worker(url=url)
    subjects = [subject for ssl, subject in tls_connections(checker) if ssl == "true"]
    assert any("rabbitflow-client" in subject for subject in subjects), subjects
    checker.feed(100, rate=200)
    checker.drain(url=url)
    checker.report("amqps with a client certificate", 0, duplicate_bound=0).check()


@pytest.mark.parametrize(
    ("host", "with_ca", "reason"),
    [
        ("localhost", False, "certificate verify failed: self-signed certificate in certificate"),
        ("127.0.0.1", True, "certificate verify failed: IP address mismatch"),
    ],
    ids=["unknown CA", "host name mismatch"],
)
def test_an_unverified_broker_is_refused(
    chaos_vhost: str, tls: TlsFiles, tmp_path: Path, host: str, with_ca: bool, reason: str
) -> None:
    topology = tmp_path / "topology.toml"
    topology.write_text('[exchanges.jobs]\ntype = "direct"\n[queues.work]\n')
    url = amqps(chaos_vhost, host, cafile=tls.ca) if with_ca else amqps(chaos_vhost, host)

    result = run_cli("topology", "declare", str(topology), "--url", url)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert reason in errors[0], errors[0]
    assert "guest:guest" not in result.stderr + result.stdout


def test_run_never_consumes_from_an_unverified_broker(
    chaos_checker: Checker, tls: TlsFiles
) -> None:
    # A certificate that cannot be verified is a configuration error at start-up, like a
    # refused login: one clear line and exit 1, never a connection without verification.
    checker = chaos_checker
    checker.write_topology()
    worker = checker.start_worker(url=amqps(checker.vhost), wait_ready=False)
    assert worker.wait(15) == 1
    assert "certificate verify failed" in worker.output()
    assert "Traceback" not in worker.output()
    assert not tls_connections(checker)
    assert not worker.has_event("consuming")


@pytest.mark.parametrize("flag", ["no_verify_ssl=1", "no_verify_ssl=true"])
def test_turning_verification_off_is_refused(tmp_path: Path, flag: str) -> None:
    # Given a URL that asks to skip certificate verification (no broker needed: refused first)
    topology = tmp_path / "topology.toml"
    topology.write_text("[queues.work]\n")
    url = f"amqps://guest:guest@127.0.0.1:1/?{flag}"

    result = run_cli("topology", "declare", str(topology), "--url", url)

    # Then nothing connects: one line saying why and what to do instead, exit 1
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "no_verify_ssl" in errors[0]
    assert "cafile" in errors[0]
