"""Bad inputs: each ends as a DLQ entry with a reason, as a clear error, or is processed as
documented; never a crash of the worker, never a loop.

The message cases share one ``rabbitflow run tests.reliability.app:app`` worker (module
fixture): each case publishes its message with ``message_id`` = the case id and waits for
the outcome. After every case the worker must still be the same process on the same
connection. Topology: ``timeout = "1s"``, ``max_body_size = "512KiB"``, 2 attempts (tier 100 ms).

The TOML, CLI and header-parser cases need no broker.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import pickle
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiormq
import pytest
from aio_pika.abc import AbstractIncomingMessage
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands as spec

from rabbitflow import _headers as h
from rabbitflow._headers import read_epoch as parse_not_before
from rabbitflow.errors import TopologyError
from rabbitflow.message import read_attempt
from rabbitflow.topology._loader import parse_topology
from tests.reliability.checker import DLQ, Checker, header_text, job, take_all
from tests.support.broker import Rabbit
from tests.support.processes import WorkerProcess, child_env, run_cli
from tests.support.waiting import wait_until

MAX_BODY = 512 * 1024
FRAME_MAX = 131072  # RabbitMQ's default: a larger body travels in several frames
ATTEMPTS = 2
PICKLE_SENTINEL = Path("/tmp/rf-reliability-unpickled")

BROKER = [pytest.mark.broker, pytest.mark.slow]


# -- the shared worker ----------------------------------------------------------------------


@dataclass
class Outcome:
    """What became of one case's message."""

    runs: int  # handler entries ("start" records)
    processed: int  # runs that finished ("done" records)
    attempts: list[int]
    dead: AbstractIncomingMessage | None

    @property
    def error(self) -> str:
        """``error-type: error-message`` of the DLQ copy."""
        assert self.dead is not None
        headers = self.dead.headers
        return (
            f"{header_text(headers.get(h.ERROR_TYPE))}: {header_text(headers.get(h.ERROR_MESSAGE))}"
        )


@dataclass
class Bench:
    """One worker for every message case of this module."""

    checker: Checker
    worker: WorkerProcess
    dead: dict[str, AbstractIncomingMessage] = field(default_factory=dict)
    sent: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def send(self, body: bytes, key: str, **properties: Any) -> None:
        """Publish one message with confirms; raise what the broker said if it refused it."""
        properties.setdefault("content_type", "application/json")
        try:
            asyncio.run(publish_raw(self.checker.url, body, key, **properties))
        except aiormq.exceptions.AMQPError:
            self.refused.append(key)
            raise
        self.sent.append(key)

    def summary(self) -> str:
        """One ``RELIABILITY`` line: what became of every message the cases sent."""
        done = self.checker.records.done()
        lost = set(self.sent) - set(done) - set(self.dead)
        twice = sum(n - 1 for n in done.values())
        return (
            f"RELIABILITY bad inputs: sent={len(self.sent)} processed={len(done)} "
            f"dlq={len(self.dead)} refused_by_broker={len(self.refused)} lost={len(lost)} "
            f"duplicates={twice} (the duplicate message_id case sends 2) worker_restarts=0 "
            f"reconnections=0"
        )

    def outcome(self, key: str, timeout: float = 20.0, expect_runs: int | None = None) -> Outcome:
        """Wait until ``key`` was processed or dead-lettered, then a little longer: a message that
        loops would show more runs."""

        def settled() -> bool:
            self.collect()
            if key in self.dead:
                return True
            return key in self.checker.records.done() and (
                expect_runs is None or self.runs(key) >= expect_runs
            )

        wait_until(settled, timeout, f"an outcome for {key!r}", interval=0.1)
        time.sleep(0.4)
        self.collect()
        starts = [run for run in self.checker.records.runs("start") if run.key == key]
        self.check_worker()
        return Outcome(
            runs=len(starts),
            processed=self.checker.records.done()[key],
            attempts=[run.attempt for run in starts],
            dead=self.dead.get(key),
        )

    def runs(self, key: str) -> int:
        return sum(1 for run in self.checker.records.runs("start") if run.key == key)

    def collect(self) -> None:
        for message in take_all(self.checker.url, DLQ):
            self.dead[message.message_id or ""] = message

    def check_worker(self) -> None:
        """Still the same process, never reconnected."""
        assert self.worker.process is not None
        assert self.worker.process.poll() is None, self.worker.output()[-3000:]
        assert not self.worker.has_event("connection to the broker lost; reconnecting")
        assert not self.worker.has_event("consumer cancelled by the broker; reconnecting")


async def publish_raw(url: str, body: bytes, key: str, **properties: Any) -> None:
    """Publish with raw AMQP properties (no client-side checks), mandatory, with a confirm."""
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        confirm = await channel.basic_publish(
            body,
            exchange="jobs",
            routing_key="work",
            properties=spec.Basic.Properties(message_id=key, delivery_mode=2, **properties),
            mandatory=True,
        )
        assert isinstance(confirm, spec.Basic.Ack), confirm
    finally:
        await connection.close()


@pytest.fixture(scope="module")
def bench(rabbit: Rabbit, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    with rabbit.vhost("rf-bad") as vhost:
        checker = Checker(rabbit, vhost, tmp_path_factory.mktemp("bad-inputs"), "bad inputs")
        with checker:
            checker.write_topology(
                prefetch=4,
                timeout="1s",
                retry=f'{{ delays = ["100ms"], max_attempts = {ATTEMPTS} }}',
                max_body_size="512KiB",
            )
            worker = checker.start_worker()
            bench = Bench(checker, worker)
            yield bench
            # After every case: the same worker, a graceful stop, nothing left in the queues
            bench.check_worker()
            code, _ = worker.stop(timeout=20)
            assert code == 0, worker.output()[-3000:]
            assert checker.counts() == {"work": 0, "work.retry.100ms": 0, "work.dlq": 0}
            print(bench.summary())


# -- bodies ---------------------------------------------------------------------------------


def padded(size: int) -> bytes:
    """A valid Job body of exactly ``size`` bytes."""
    head = job(1, pad="")
    return job(1, pad="x" * (size - len(head)))


DECODE = "rabbitflow.errors.DecodeError"

# (case id, body, None = processed once | the DLQ reason's fragment; the handler never runs)
BODIES: list[tuple[str, bytes, str | None]] = [
    ("empty", b"", "Invalid JSON: EOF while parsing a value"),
    ("lone brace", b"{", "Invalid JSON: EOF while parsing an object"),
    ("trailing garbage", b'{"id": 1} garbage', "trailing characters"),
    ("NaN", b'{"id": NaN}', "id: Input should be a finite number"),
    ("bare NaN", b"NaN", "Input should be an object"),
    ("duplicate keys (last wins)", b'{"id": 1, "id": 2}', None),
    ("100k-deep nesting", b'{"id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "recursion limit"),
    ("5,000-digit integer", b'{"id": 1' + b"0" * 5000 + b"}", "number out of range"),
    ("30-digit integer", b'{"id": 1' + b"0" * 30 + b"}", None),
    ("top-level array", b"[1, 2]", "Input should be an object"),
    ("top-level null", b"null", "Input should be an object"),
    ("wrong type", b'{"id": {"a": 1}}', "id: Input should be a valid integer"),
    ("missing field", b"{}", "id: Field required"),
    ("extra field", b'{"id": 1, "evil": true}', "evil: Extra inputs are not permitted"),
    ("UTF-8 BOM", b'\xef\xbb\xbf{"id": 1}', "Invalid JSON"),
    ("invalid UTF-8", b'{"id": 1, "pad": "\xff"}', "Invalid JSON"),
    ("lone surrogate", b'{"id": 1, "pad": "\\ud800"}', "Invalid JSON"),
    ("just over one frame", padded(FRAME_MAX + 1), None),
    ("at the size limit", padded(MAX_BODY), None),
    ("one byte over the size limit", padded(MAX_BODY + 1), "over the limit of 524288 bytes"),
]


@pytest.mark.parametrize(("body", "reason"), [b[1:] for b in BODIES], ids=[b[0] for b in BODIES])
@pytest.mark.broker
@pytest.mark.slow
def test_bad_body(bench: Bench, request: pytest.FixtureRequest, body: bytes, reason: str) -> None:
    key = f"body-{request.node.callspec.id}"
    bench.send(body, key)
    outcome = bench.outcome(key)
    if reason is None:
        assert (outcome.runs, outcome.processed, outcome.dead) == (1, 1, None)
    else:
        assert outcome.runs == 0, "an undecodable body must not reach the handler"
        assert outcome.error.startswith(f"{DECODE}: "), outcome.error
        assert reason in outcome.error, outcome.error


# -- properties -----------------------------------------------------------------------------


class _Exploit:
    """Unpickling this creates a file: proof that a pickle body was (not) loaded."""

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (Path.touch, (PICKLE_SENTINEL,))


def _gzip_bomb(size: int = 100 * 1024 * 1024) -> bytes:
    """``size`` zero bytes gzipped (about 100 KiB): 1,000 times smaller than it unpacks."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb") as packed:
        chunk = bytes(1024 * 1024)
        for _ in range(size // len(chunk)):
            packed.write(chunk)
    return out.getvalue()


@pytest.mark.broker
@pytest.mark.slow
def test_missing_content_type_is_read_as_json(bench: Bench) -> None:
    bench.send(job(1), "prop-no-content-type", content_type=None)
    assert bench.outcome("prop-no-content-type").processed == 1


@pytest.mark.broker
@pytest.mark.slow
def test_text_plain_is_refused_for_a_model(bench: Bench) -> None:
    bench.send(job(1), "prop-text-plain", content_type="text/plain")
    outcome = bench.outcome("prop-text-plain")
    assert outcome.runs == 0
    assert "content type 'text/plain' cannot be decoded into Job" in outcome.error


@pytest.mark.broker
@pytest.mark.slow
def test_pickle_is_never_unpickled(bench: Bench) -> None:
    PICKLE_SENTINEL.unlink(missing_ok=True)
    body = pickle.dumps(_Exploit())
    bench.send(body, "prop-pickle", content_type="application/x-python-pickle")
    outcome = bench.outcome("prop-pickle")
    assert outcome.runs == 0
    assert "never unpickles" in outcome.error
    assert not PICKLE_SENTINEL.exists()


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["gzip", "x-unknown"])
def test_content_encoding_is_refused_not_unpacked(bench: Bench, encoding: str) -> None:
    # A gzip bomb would unpack to 100 MiB; rabbitflow undoes no content encoding at all.
    body = _gzip_bomb() if encoding == "gzip" else job(1)
    key = f"prop-encoding-{encoding}"
    bench.send(body, key, content_encoding=encoding)
    outcome = bench.outcome(key)
    assert outcome.runs == 0
    assert f"content encoding {encoding!r} is not supported" in outcome.error


@pytest.mark.broker
@pytest.mark.slow
def test_duplicate_message_id_is_processed_twice(bench: Bench) -> None:
    # The broker does not deduplicate: two messages with one id are two messages. Idempotence
    # keyed on message_id is the handler's job (docs/recoverability.md).
    bench.send(job(1), "prop-duplicate-id")
    bench.send(job(1), "prop-duplicate-id")
    outcome = bench.outcome("prop-duplicate-id", expect_runs=2)
    assert (outcome.runs, outcome.processed) == (2, 2)


@pytest.mark.broker
@pytest.mark.slow
def test_priority_on_a_queue_without_priorities(bench: Bench) -> None:
    bench.send(job(1), "prop-priority-255", priority=255)
    assert bench.outcome("prop-priority-255").processed == 1


@pytest.mark.broker
@pytest.mark.slow
def test_expiration_zero(bench: Bench) -> None:
    # "0": deliver now or never. With a consumer that has room, it is delivered; had it waited
    # in the queue, the broker would have dead-lettered it to work.dlq (x-death "expired").
    bench.send(job(1), "prop-expiration-0", expiration="0")
    outcome = bench.outcome("prop-expiration-0")
    assert outcome.processed == 1 or (outcome.dead is not None and outcome.runs == 0)


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize("expiration", ["abc", "-1", "1.5"])
def test_invalid_expiration_is_refused_by_the_broker(bench: Bench, expiration: str) -> None:
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="expiration"):
        bench.send(job(1), f"prop-expiration-{expiration}", expiration=expiration)
    bench.check_worker()


# -- headers --------------------------------------------------------------------------------


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        value = {"a": value}
    return value


# (case id, headers, the attempt the handler must see)
HEADERS: list[tuple[str, dict[str, Any], int]] = [
    ("x-death not a list", {"x-death": "garbage"}, 1),
    ("x-death junk entries", {"x-death": [{"count": "many"}, 7, None]}, 1),
    ("string x-delivery-count", {"x-delivery-count": "5"}, 1),
    ("negative rabbitflow-attempt", {h.ATTEMPT: -3}, 1),
    ("non-numeric rabbitflow-attempt", {h.ATTEMPT: "abc"}, 1),
    ("float rabbitflow-attempt", {h.ATTEMPT: 1.5}, 1),
    ("10k header entries", {f"h{i}": i for i in range(10_000)}, 1),
    ("header table nested 100 deep", {"deep": _nested(100)}, 1),
    ("malformed traceparent", {"traceparent": "00-zz-not-a-trace-01", "tracestate": "=,="}, 1),
    ("garbage rabbitflow-not-before", {h.NOT_BEFORE: "not a time"}, 1),
]


@pytest.mark.parametrize(
    ("headers", "attempt"), [c[1:] for c in HEADERS], ids=[c[0] for c in HEADERS]
)
@pytest.mark.parametrize("action", ["ok", "fail"])
@pytest.mark.broker
@pytest.mark.slow
def test_bad_headers(
    bench: Bench,
    request: pytest.FixtureRequest,
    headers: dict[str, Any],
    attempt: int,
    action: str,
) -> None:
    key = f"header-{request.node.callspec.id}"
    bench.send(job(1, action=action), key, headers=headers)
    outcome = bench.outcome(key)
    assert outcome.attempts[0] == attempt
    if action == "ok":
        assert (outcome.runs, outcome.processed, outcome.dead) == (1, 1, None)
        return
    # A failing handler: retried once, then dead-lettered with its reason; the broker's x-*
    # junk is not carried onto the copies, the user's headers are.
    assert outcome.runs == ATTEMPTS
    assert outcome.error == "RuntimeError: job 1 always fails"
    assert outcome.dead is not None
    copied = outcome.dead.headers
    assert not [name for name in copied if name.startswith("x-") and name != "x-death"]
    assert copied[h.ATTEMPT] == ATTEMPTS
    for name in headers:
        if not name.startswith(("x-", "rabbitflow-")):
            assert name in copied, name


@pytest.mark.broker
@pytest.mark.slow
def test_huge_rabbitflow_attempt_dead_letters_at_once(bench: Bench) -> None:
    bench.send(job(1, action="fail"), "header-huge-attempt", headers={h.ATTEMPT: 10**12})
    outcome = bench.outcome("header-huge-attempt")
    assert outcome.attempts == [10**12]
    assert outcome.dead is not None
    assert outcome.dead.headers[h.ATTEMPT] == 10**12


# -- handlers -------------------------------------------------------------------------------

# (action, error type in the DLQ, handler runs)
HANDLERS = [
    ("systemexit", "SystemExit", ATTEMPTS),
    ("keyboardinterrupt", "KeyboardInterrupt", ATTEMPTS),
    ("hang", "rabbitflow.errors.HandlerTimeout", ATTEMPTS),
    ("reject", "rabbitflow.errors.Reject", 1),
]


@pytest.mark.parametrize(("action", "error_type", "runs"), HANDLERS, ids=[c[0] for c in HANDLERS])
@pytest.mark.broker
@pytest.mark.slow
def test_bad_handler(bench: Bench, action: str, error_type: str, runs: int) -> None:
    # (A handler calling os._exit is tests/reliability/test_faults.py's poison-message test.)
    key = f"handler-{action}"
    bench.send(job(1, action=action), key)
    outcome = bench.outcome(key)
    assert outcome.runs == runs
    assert outcome.processed == 0
    assert outcome.error.startswith(f"{error_type}: "), outcome.error


# -- TOML (cases tests/test_topology_loader.py does not have) --------------------------------

# (case id, file, the problem as printed)
TOML: list[tuple[str, str, str]] = [
    (
        "negative duration",
        '[queues.a]\nretry = { delays = ["-1s"] }\n',
        "queues.a.retry.delays[0]: '-1s' is not a duration",
    ),
    (
        "negative delay in ms",
        "[queues.a]\nretry = { delays = [-5, 10] }\n",
        "queues.a.retry.delays[0]: delays must be positive",
    ),
    ("no delays", "[queues.a]\nretry = { delays = [] }\n", "queues.a.retry.delays:"),
    (
        "duplicate queue table",
        "[queues.a]\nprefetch = 1\n[queues.a]\nprefetch = 2\n",
        "topology.toml:3:10: TOML syntax error: Cannot declare ('queues', 'a') twice",
    ),
    (
        "duplicate queue, quoted and bare",
        '[queues.a]\n[queues."a"]\n',
        "TOML syntax error: Cannot declare ('queues', 'a') twice",
    ),
    (
        "duplicate key",
        "[queues.a]\nprefetch = 1\nprefetch = 2\n",
        "topology.toml:3:13: TOML syntax error: Cannot overwrite a value",
    ),
    ("NUL byte", "[queues.a]\nprefetch = 1\x00\n", "topology.toml:2:13: TOML syntax error"),
    (
        "duration unit typo",
        '[queues.a]\ntimeout = "5sec"\n',
        "queues.a.timeout: '5sec' is not a duration",
    ),
    ("infinite duration", "[queues.a]\ntimeout = inf\n", "queues.a.timeout: inf is not a duration"),
    ("NaN prefetch", "[queues.a]\nprefetch = nan\n", "queues.a.prefetch:"),
    ("fractional prefetch", "[queues.a]\nprefetch = 1.5\n", "queues.a.prefetch:"),
    ("prefetch over 65535", "[queues.a]\nprefetch = 70000\n", "queues.a.prefetch:"),
    (
        "max_attempts 0",
        '[queues.a]\nretry = { delays = ["1s"], max_attempts = 0 }\n',
        "max_attempts",
    ),
    ("crash_limit 0", "[queues.a]\ncrash_limit = 0\n", "queues.a.crash_limit:"),
    (
        "bad size",
        '[queues.a]\nmax_body_size = "16 parsecs"\n',
        "queues.a.max_body_size: '16 parsecs' is not a size",
    ),
    (
        "256-byte name in 2-byte characters",
        '[defaults]\nretry = false\ndead_letter = false\n[queues."' + "é" * 128 + '"]\n',
        "name is 256 bytes; RabbitMQ allows at most 255",
    ),
    ("empty name", '[queues.""]\n', 'queues."": empty name'),
    # Strict types (issue 29): a string is never a boolean or a number, a float never an integer.
    (
        'dead_letter = "false" (was read as true)',
        '[defaults]\ndead_letter = "false"\n[queues.a]\n',
        "defaults.dead_letter: 'false' is a string, not true or false "
        "(write dead_letter = false, without quotes)",
    ),
    (
        'durable = "yes"',
        '[queues.a]\ndurable = "yes"\n',
        "queues.a.durable: 'yes' is a string, not true or false",
    ),
    ("durable = 1", "[queues.a]\ndurable = 1\n", "queues.a.durable: 1 is an integer"),
    (
        'prefetch = "50"',
        '[queues.a]\nprefetch = "50"\n',
        "queues.a.prefetch: '50' is a string, not an integer (write prefetch = 50, without quotes)",
    ),
    ("prefetch = 50.0", "[queues.a]\nprefetch = 50.0\n", "(write prefetch = 50)"),
    (
        'max_attempts = "4"',
        '[queues.a]\nretry = { delays = ["1s"], max_attempts = "4" }\n',
        "queues.a.retry.max_attempts: '4' is a string, not an integer",
    ),
    (
        'a quoted "x-max-length"',
        '[queues.a]\narguments = { "x-max-length" = "1000" }\n',
        '(write "x-max-length" = 1000, without quotes)',
    ),
]


@pytest.mark.parametrize(("toml", "expected"), [c[1:] for c in TOML], ids=[c[0] for c in TOML])
def test_bad_toml_is_one_clear_error(toml: str, expected: str) -> None:
    with pytest.raises(TopologyError) as raised:
        parse_topology(toml, "topology.toml")
    assert expected in str(raised.value), str(raised.value)


def test_non_utf8_topology_in_run_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "topology.toml"
    path.write_bytes(b'[queues."caf\xe9"]\n')
    result = run_cli("run", "tests.reliability.app:app", "--topology", str(path))
    assert result.returncode == 1
    assert_one_error(result.stderr, "not valid UTF-8")


@pytest.mark.broker
def test_a_delay_over_rabbitmq_ttl_limit_is_refused_before_the_broker(
    rabbit: Rabbit, vhost: str, tmp_path: Path
) -> None:
    # RabbitMQ caps x-message-ttl at 2^32-1 ms (49.7 days): the loader refuses a longer tier
    # with the path of the delay, before anything touches the broker.
    path = tmp_path / "topology.toml"
    path.write_text(
        '[exchanges.jobs]\ntype = "direct"\n[queues.a]\nqueue_type = "classic"\n'
        'retry = { delays = ["100000h"] }\n'
    )
    result = run_cli("topology", "declare", str(path), "--url", rabbit.vhost_url(vhost))
    assert result.returncode == 1
    assert_one_error(result.stderr, "queues.a.retry.delays[0]: 360000000000 ms is over RabbitMQ")
    assert rabbit.list(vhost, "queues", "name") == []  # nothing was declared


# -- the command line -------------------------------------------------------------------------

SECRET = "s3cret-pw"
UNREACHABLE = f"amqp://app:{SECRET}@127.0.0.1:1/"


def assert_one_error(stderr: str, fragment: str) -> None:
    """One ``error:`` line (a topology error lists its problems indented below it), no
    traceback, and ``fragment`` in what was printed."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert fragment in stderr, stderr


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("tests.reliability.app:", "must be"),
        (":app", "must be"),
        ("tests.reliability.app:QUEUE", "is a str, not a rabbitflow App"),
        ("tests.reliability.app:nope", "has no attribute 'nope'"),
        ("tests/reliability/app.py:app", "could not import module"),
    ],
)
def test_bad_module_app(target: str, fragment: str) -> None:
    result = run_cli("run", target, "--url", UNREACHABLE)
    assert result.returncode in (1, 2), result
    assert_one_error(result.stderr, fragment)
    assert SECRET not in result.stdout + result.stderr


def test_a_class_that_is_not_an_app_is_named_for_what_it_is() -> None:
    result = run_cli("run", "tests.reliability.app:Job", "--url", UNREACHABLE)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: 'tests.reliability.app:Job' is the class Job (a pydantic model), not a "
        'rabbitflow App (point at the object created with App(...), e.g. "myservice.main:app")'
    ]


def test_a_factory_that_raises_shows_the_users_traceback() -> None:
    # Written as a call, Job is a factory; what it raises is the user's error.
    result = run_cli("run", "tests.reliability.app:Job()", "--url", UNREACHABLE)
    assert result.returncode == 1
    first = result.stderr.splitlines()[0]
    assert first == (
        "error: importing 'tests.reliability.app' failed (the traceback is from your code):"
    )
    assert "ValidationError: 1 validation error for Job" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["run", "tests.reliability.app:app", "--topology", "/nonexistent/topology.toml"],
        ["topology", "validate", "/nonexistent/topology.toml"],
        ["topology", "declare", "/nonexistent/topology.toml", "--url", UNREACHABLE],
    ],
    ids=["run", "validate", "declare"],
)
def test_missing_topology_file(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 1
    assert_one_error(result.stderr, "file not found")


@pytest.mark.parametrize(
    "args",
    [
        ["topology", "declare", "{topology}"],
        ["topology", "plan", "{topology}"],
        ["dlq", "list", "work.dlq"],
        ["dlq", "purge", "work.dlq", "--yes"],
        ["dlq", "replay", "work.dlq"],
        ["publish", "jobs", "work", "{}"],
    ],
    ids=lambda args: " ".join(args[:2]),
)
def test_unreachable_broker_never_echoes_the_password(args: list[str], tmp_path: Path) -> None:
    topology = tmp_path / "topology.toml"
    topology.write_text('[exchanges.jobs]\ntype = "direct"\n[queues.work]\n')
    argv = [arg.replace("{topology}", str(topology)) for arg in args]
    result = run_cli(*argv, "--url", UNREACHABLE)
    assert result.returncode == 1, result
    assert SECRET not in result.stdout + result.stderr
    assert_one_error(result.stderr, "amqp://app:***@127.0.0.1:1/")


def test_run_against_an_unreachable_broker_retries_masked_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    topology = tmp_path / "topology.toml"
    topology.write_text('[exchanges.jobs]\ntype = "direct"\n[queues.work]\n')
    worker = WorkerProcess(
        "tests.reliability.app:app", UNREACHABLE, topology, tmp_path / "w.log",
        child_env(RF_REL_DB="/nonexistent.sqlite"),
    ).start()  # fmt: skip
    try:
        worker.wait_for_event("broker unreachable; retrying", timeout=15)
        worker.signal(signal.SIGTERM)
        assert worker.wait(10) == 0
    finally:
        worker.kill()
    assert SECRET not in worker.output()
    assert "amqp://app:***@127.0.0.1:1/" in worker.output()


# -- header parsers (hypothesis) ---------------------------------------------------------------

field_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.binary()
    | st.datetimes(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
header_names = st.sampled_from(
    [h.ATTEMPT, "x-delivery-count", "x-death", h.NOT_BEFORE, h.ERROR_TYPE, "traceparent"]
) | st.text(max_size=20)
header_tables = st.dictionaries(header_names, field_values, max_size=8)


@given(header_tables)
@settings(max_examples=300, deadline=None)
def test_read_attempt_is_a_positive_int_for_any_headers(headers: dict[str, Any]) -> None:
    attempt = read_attempt(headers)
    assert type(attempt) is int
    assert attempt >= 1


@given(st.integers(min_value=1, max_value=2**62), st.integers(min_value=0, max_value=2**62))
def test_read_attempt_adds_broker_returns(attempt: int, returns: int) -> None:
    headers = {h.ATTEMPT: attempt, "x-delivery-count": returns}
    assert read_attempt(headers) == attempt + returns


@given(field_values)
@settings(max_examples=300, deadline=None)
def test_parse_not_before_never_raises(value: Any) -> None:
    parsed = parse_not_before(value)
    assert parsed is None or isinstance(parsed, float)


@given(st.text() | st.binary())
@settings(max_examples=300, deadline=None)
def test_parse_not_before_never_raises_on_text(value: str | bytes) -> None:
    parsed = parse_not_before(value)
    assert parsed is None or isinstance(parsed, float)


@given(
    st.datetimes(
        min_value=datetime(1971, 1, 1),
        max_value=datetime(9998, 1, 1),
        timezones=st.just(UTC),
    )
)
def test_parse_not_before_round_trips_what_settle_writes(moment: datetime) -> None:
    # settle writes an aware ISO-8601 time, as text; a copy may carry it as bytes
    text = moment.isoformat()
    expected = moment.timestamp()
    assert parse_not_before(text) == pytest.approx(expected)
    assert parse_not_before(text.encode()) == pytest.approx(expected)
    assert parse_not_before((moment + timedelta(hours=2)).isoformat()) == pytest.approx(
        expected + 7200
    )


@given(header_tables)
@settings(max_examples=300, deadline=None)
def test_carried_headers_drops_broker_and_failure_headers_keeps_the_rest(
    headers: dict[str, Any],
) -> None:
    carried = h.carried_headers(headers)
    for name, value in headers.items():
        dropped = name.startswith("x-") or name in h.FAILURE_HEADERS
        assert (name in carried) is not dropped
        if not dropped:
            assert carried[name] is value
    assert set(carried) <= set(headers)


def test_carried_headers_of_nothing() -> None:
    assert h.carried_headers(None) == {}
    assert h.carried_headers({}) == {}
