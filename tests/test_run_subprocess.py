"""``rabbitflow run`` as users run it: a subprocess against a real broker, stopped by signals.

Each test has its own vhost. Handlers of ``tests/apps`` record every run in a file, so the
tests count what was processed, including across a ``kill -9``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from rabbitflow.cli._run import DUPLICATE_TERM_WINDOW
from tests.support.amqp import drain, jobs, message_counts, publish
from tests.support.broker import (
    Rabbit,
    queue_counts,
    queue_names,
    wait_queues_empty,
    worker_connections,
)
from tests.support.processes import ROOT, Workers, run_cli
from tests.support.topology import work_topology
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.crash]

WORK = "tests.apps.work:async_app"
SYNC_WORK = "tests.apps.work:sync_app"


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


# -- 1. end to end ---------------------------------------------------------------------------


@pytest.mark.slow
def test_orders_end_to_end_each_order_handled_exactly_once(
    rabbit: Rabbit, vhost: str, vhost_url: str, workers: Workers
) -> None:
    # Given the root topology declared and the orders service running
    declared = run_cli("topology", "declare", "topology.toml", "--url", vhost_url)
    assert declared.returncode == 0, declared.stderr
    worker = workers.start("tests.apps.orders:app", ROOT / "topology.toml")
    count = 2000
    orders = [
        (
            f"order-{i}",
            json.dumps({"order_id": i, "customer": f"c{i % 7}", "amount": 10.0 + i}).encode(),
        )
        for i in range(1, count + 1)
    ]

    # When 2,000 orders are published with confirms
    def tier(message_id: str) -> dict[str, str]:
        vip = int(message_id.split("-")[1]) % 10 == 0
        return {"customer-tier": "vip" if vip else "standard"}

    publish(vhost_url, "orders", "order.created", orders, headers=tier)

    # Then every order is billed, paid, shipped and audited exactly once
    records = workers.records
    records.wait_for("audit", 2 * count, timeout=90)
    records.wait_for("shipping", count, timeout=30)
    expected = Counter(str(i) for i in range(1, count + 1))
    assert records.ids("billing") == expected
    assert records.ids("shipping") == expected
    assert Counter(f"{key} {oid}" for key, oid in records.of("audit")) == Counter(
        f"{key} {i}" for i in range(1, count + 1) for key in ("order.created", "order.paid")
    )
    assert records.ids("vip") == Counter(str(i) for i in range(10, count + 1, 10))
    # and SIGTERM stops the service cleanly
    code, _ = worker.stop()
    assert code == 0, worker.output()
    assert worker.has_event("stopped")
    # and every queue (work, retry tiers, DLQs) ends empty
    counts = message_counts(vhost_url, queue_names(rabbit, vhost))
    assert len(counts) == 16
    assert set(counts.values()) == {0}, counts


# -- 2. prefetch -----------------------------------------------------------------------------


@pytest.mark.slow
def test_prefetch_caps_unacked_deliveries(
    rabbit: Rabbit, vhost: str, vhost_url: str, workers: Workers, tmp_path: Path
) -> None:
    # Given a worker with prefetch 5 and a handler taking 0.2 s
    worker = workers.start(WORK, work_topology(tmp_path, prefetch=5), sleep=0.2)
    count = 150

    # When 150 messages wait in the queue (6 s of work at 5 at a time)
    publish(vhost_url, "jobs", "work", jobs("m", count))

    # Then the broker never has more than 5 deliveries unacked on the worker
    unacked: list[int] = []

    def finished() -> bool:
        if len(workers.records.of("done")) >= count:
            return True
        unacked.append(queue_counts(rabbit, vhost)["work"][2])
        return False

    wait_until(finished, 60, "every message to be handled", interval=0.1)
    assert max(unacked) <= 5, unacked
    assert max(unacked) > 0, unacked
    assert len(unacked) >= 2, f"too few samples to judge: {unacked}"
    assert workers.records.ids("done") == Counter(f"m-{i}" for i in range(count))
    worker.stop()


# -- 3. heartbeats during a long sync handler ------------------------------------------------


@pytest.mark.slow
def test_long_sync_handler_keeps_the_connection_alive(
    rabbit: Rabbit, vhost: str, vhost_url: str, workers: Workers, tmp_path: Path
) -> None:
    # Given a sync handler that blocks for 10 s and heartbeats every 2 s
    worker = workers.start(SYNC_WORK, work_topology(tmp_path), "--heartbeat", "2", sleep=10)
    assert [t for _, t in worker_connections(rabbit, vhost)] == ["2"]

    # When it handles a message (five heartbeat intervals)
    publish(vhost_url, "jobs", "work", jobs("long", 1))
    workers.records.wait_for("done", 1, timeout=20)

    # Then the connection survived: acked once, never redelivered, no reconnection
    wait_queues_empty(rabbit, vhost, timeout=5)
    code, _ = worker.stop()
    assert code == 0
    assert workers.records.of("start") == [["long-0"]]
    assert workers.records.of("done") == [["long-0", "False"]]
    events = {entry["event"] for entry in worker.events()}
    assert "connection to the broker lost; reconnecting" not in events
    assert "reconnected" not in events


# -- 4. graceful shutdown --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("target", [WORK, SYNC_WORK])
def test_sigterm_lets_in_flight_handlers_finish(
    rabbit: Rabbit, vhost: str, vhost_url: str, workers: Workers, tmp_path: Path, target: str
) -> None:
    # Given three 2-second handlers running
    worker = workers.start(target, work_topology(tmp_path), "--shutdown-timeout", "5", sleep=2)
    publish(vhost_url, "jobs", "work", jobs("m", 3))
    workers.records.wait_for("start", 3, timeout=10)

    # When the worker gets SIGTERM
    code, took = worker.stop()

    # Then it waits for them, acks them and exits 0 well before the shutdown timeout
    assert code == 0, worker.output()
    assert took < 3.5, took
    assert workers.records.ids("done") == Counter(["m-0", "m-1", "m-2"])
    assert queue_counts(rabbit, vhost)["work"] == (0, 0, 0)


@pytest.mark.slow
@pytest.mark.parametrize("target", [WORK, SYNC_WORK])
def test_sigterm_returns_unfinished_message_after_shutdown_timeout(
    rabbit: Rabbit, vhost: str, vhost_url: str, workers: Workers, tmp_path: Path, target: str
) -> None:
    # Given a handler that would run for 30 s
    worker = workers.start(target, work_topology(tmp_path), "--shutdown-timeout", "2", sleep=30)
    publish(vhost_url, "jobs", "work", jobs("stuck", 1))
    workers.records.wait_for("start", 1, timeout=10)

    # When the worker gets SIGTERM with a 2 s shutdown timeout
    code, took = worker.stop()

    # Then it gives up on the handler after 2 s and the message is back in the queue
    assert code == 0, worker.output()
    assert took < 4.5, took
    assert worker.has_event("shutdown timeout reached; unfinished messages go back to the queue")
    counts = queue_counts(rabbit, vhost)
    assert counts["work"][1] == 1, counts
    assert counts["work.dlq"][0] == 0, counts
    assert workers.records.of("done") == []


@pytest.mark.slow
def test_a_second_signal_exits_at_once(
    rabbit: Rabbit, vhost: str, vhost_url: str, workers: Workers, tmp_path: Path
) -> None:
    # Given a worker draining a 30 s handler with a 30 s shutdown timeout
    worker = workers.start(WORK, work_topology(tmp_path), "--shutdown-timeout", "30", sleep=30)
    publish(vhost_url, "jobs", "work", jobs("stuck", 1))
    workers.records.wait_for("start", 1, timeout=10)
    worker.signal(signal.SIGTERM)
    worker.wait_for_event("shutdown requested; draining in-flight messages")
    time.sleep(DUPLICATE_TERM_WINDOW + 0.1)

    # When a second SIGTERM arrives (later than a duplicate of the first would)
    code, took = worker.stop()

    # Then it exits now (1), and the broker puts the message back
    assert code == 1
    assert took < 2, took
    assert worker.has_event("second signal: exiting now; unacked messages return to their queues")
    wait_until(
        lambda: queue_counts(rabbit, vhost)["work"][1] == 1, 10, "the message back in the queue"
    )


@pytest.mark.slow
def test_a_duplicated_sigterm_is_one_stop_request(
    rabbit: Rabbit, vhost: str, vhost_url: str, workers: Workers, tmp_path: Path
) -> None:
    # Given two 2-second handlers running
    worker = workers.start(WORK, work_topology(tmp_path), "--shutdown-timeout", "5", sleep=2)
    publish(vhost_url, "jobs", "work", jobs("d", 2))
    workers.records.wait_for("start", 2, timeout=10)

    # When SIGTERM arrives twice at once (a service manager signalling the process group
    # while the supervisor forwards the same signal)
    worker.signal(signal.SIGTERM)
    code, _ = worker.stop()

    # Then it still drains: both handlers finish, are acked, and it exits 0
    assert code == 0, worker.output()
    assert workers.records.ids("done") == Counter(["d-0", "d-1"])
    assert queue_counts(rabbit, vhost)["work"] == (0, 0, 0)


def test_sigterm_while_the_broker_is_unreachable_exits_promptly(workers: Workers) -> None:
    # Given a worker retrying a broker that refuses connections
    workers.url = "amqp://guest:guest@127.0.0.1:1/"
    worker = workers.start(WORK, None, wait_ready=False)
    worker.wait_for_event("broker unreachable; retrying")

    # When it gets SIGTERM, Then it stops waiting and exits 0
    code, took = worker.stop()
    assert code == 0, worker.output()
    assert took < 2, took


# -- 5. crash ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_mid_flight_loses_nothing(
    rabbit: Rabbit, vhost: str, vhost_url: str, workers: Workers, tmp_path: Path
) -> None:
    # Given a worker busy with a backlog of 300 messages
    topology = work_topology(tmp_path, prefetch=20, queue_type="quorum")
    first = workers.start(WORK, topology, sleep=0.1)
    count = 300
    publish(vhost_url, "jobs", "work", jobs("m", count))
    workers.records.wait_for("done", 40, timeout=20)

    # When it is killed with SIGKILL and started again
    first.signal(signal.SIGKILL)
    assert first.wait(5) == -signal.SIGKILL
    done_before = len(workers.records.of("done"))
    assert done_before < count, "the backlog was gone before the kill"
    second = workers.start(WORK, topology, sleep=0.1)

    # Then every message is processed at least once and the queue ends empty
    def all_done() -> bool:
        return set(workers.records.ids("done")) == {f"m-{i}" for i in range(count)}

    wait_until(all_done, 60, "every message to be handled after the restart")
    code, _ = second.stop()
    assert code == 0
    assert message_counts(vhost_url, ["work", "work.dlq"]) == {"work": 0, "work.dlq": 0}
    # the deliveries in hand at the kill came back marked redelivered
    assert any(redelivered == "True" for _, redelivered in workers.records.of("done"))


# -- 6. reconnection --------------------------------------------------------------------------


@pytest.mark.slow
def test_reconnects_after_the_broker_closes_its_connection(
    rabbit: Rabbit, vhost: str, vhost_url: str, workers: Workers, tmp_path: Path
) -> None:
    # Given a worker in the middle of ten 0.3 s handlers, with 9 s of work waiting (so that
    # handlers are still in hand however long rabbitmqctl takes to close the connection)
    worker = workers.start(WORK, work_topology(tmp_path, queue_type="quorum"), sleep=0.3)
    publish(vhost_url, "jobs", "work", jobs("before", 300))
    workers.records.wait_for("start", 10, timeout=10)

    # When the broker closes the worker's connection (only this vhost's)
    connections = worker_connections(rabbit, vhost)
    assert len(connections) == 1, connections
    for pid, _ in connections:
        rabbit.ctl("close_connection", pid, "closed by test")

    # Then the worker reconnects and resumes consuming; nothing is lost
    worker.wait_for_event("reconnected", timeout=15)
    publish(vhost_url, "jobs", "work", jobs("after", 20))
    expected = {f"before-{i}" for i in range(300)} | {f"after-{i}" for i in range(20)}

    def all_done() -> bool:
        return set(workers.records.ids("done")) == expected

    wait_until(all_done, 60, "every message to be handled")
    assert worker.has_event("connection to the broker lost; reconnecting")
    # the handlers cut off by the lost connection ran again on the redelivered messages
    assert any(redelivered == "True" for _, redelivered in workers.records.of("done"))
    code, _ = worker.stop()
    assert code == 0
    assert message_counts(vhost_url, ["work", "work.dlq"]) == {"work": 0, "work.dlq": 0}


# -- supervision and least privilege ----------------------------------------------------------


@pytest.mark.slow
def test_workers_option_restarts_a_crashed_worker(
    rabbit: Rabbit, vhost: str, vhost_url: str, workers: Workers, tmp_path: Path
) -> None:
    # Given two worker processes under the supervisor
    supervisor = workers.start(WORK, work_topology(tmp_path), "--workers", "2", wait_ready=False)
    wait_until(lambda: len(worker_connections(rabbit, vhost)) == 2, 20, "two connections")
    children = [e["pid"] for e in supervisor.events() if e.get("event") == "worker started"]
    assert len(children) == 2

    # When one of them is killed
    os.kill(children[0], signal.SIGKILL)

    # Then the supervisor starts another one, which consumes
    supervisor.wait_for_event("worker exited; restarting it")
    wait_until(
        lambda: len([e for e in supervisor.events() if e.get("event") == "consuming"]) == 3,
        20,
        "the replacement to consume",
    )
    publish(vhost_url, "jobs", "work", jobs("m", 20))
    workers.records.wait_for("done", 20, timeout=10)
    # and SIGTERM stops every worker and the supervisor with exit code 0
    code, _ = supervisor.stop()
    assert code == 0, supervisor.output()
    assert len([e for e in supervisor.events() if e.get("event") == "stopped"]) == 2
    wait_until(lambda: not worker_connections(rabbit, vhost), 10, "no connection left")


@pytest.mark.slow
def test_no_declare_runs_without_configure_permission(
    rabbit: Rabbit, vhost: str, vhost_url: str, workers: Workers, tmp_path: Path
) -> None:
    # Given the topology declared by an admin and a user who may not configure the vhost
    topology = work_topology(tmp_path)
    declared = run_cli("topology", "declare", str(topology), "--url", vhost_url)
    assert declared.returncode == 0, declared.stderr
    rabbit.admin.set_permissions(vhost, "guest", "^$", ".*", ".*")

    # When the worker runs with --no-declare, Then it checks the topology and consumes
    worker = workers.start(WORK, topology, "--no-declare")
    assert worker.has_event("topology verified (--no-declare)")
    publish(vhost_url, "jobs", "work", jobs("m", 5))
    workers.records.wait_for("done", 5, timeout=10)
    assert worker.stop()[0] == 0

    # and without --no-declare it exits 1 naming the missing permission
    refused = workers.start(WORK, topology, wait_ready=False)
    assert refused.wait(15) == 1
    assert "lacks configure permission" in refused.output()
    assert_no_traceback(refused.output())


# -- 7. start-up errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("nodots", 'must be "module:attribute"'),
        ("tests.apps.no_such_module:app", "could not import module 'tests.apps.no_such_module'"),
        ("tests.apps.work:no_such_app", "has no attribute 'no_such_app'"),
        ("tests.apps.wrong_queue:app", 'did you mean "work"?'),
    ],
)
def test_run_start_up_errors_are_one_line(target: str, expected: str) -> None:
    result = run_cli("run", target, "--url", "amqp://guest:guest@127.0.0.1:1/")
    assert result.returncode in (1, 2), result
    assert_no_traceback(result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert expected in errors[0]


@pytest.mark.parametrize(
    ("target", "culprit"),
    [
        ("tests.apps.broken_import:app", "cannot import name 'no_such_helper'"),
        ("tests.apps.missing_dependency:app", "No module named 'rabbitflow_test_not_installed'"),
    ],
)
def test_run_shows_the_traceback_of_an_import_error_in_user_code(target: str, culprit: str) -> None:
    result = run_cli("run", target, "--url", "amqp://guest:guest@127.0.0.1:1/")
    assert result.returncode == 1
    module = target.split(":")[0]
    assert f"importing {module!r} failed" in result.stderr
    # the user's traceback, pointing at the user's file, not rabbitflow's internals
    assert "Traceback" in result.stderr
    assert f"tests/apps/{module.rsplit('.', 1)[1]}.py" in result.stderr
    assert culprit in result.stderr


def test_a_failing_startup_hook_fails_the_run_with_its_error(
    rabbit: Rabbit, vhost: str, vhost_url: str
) -> None:
    result = run_cli("run", "tests.apps.failing_startup:app", "--url", vhost_url)

    assert result.returncode == 1
    assert "RuntimeError: database unreachable" in result.stderr
    assert "tests/apps/failing_startup.py" in result.stderr
    assert worker_connections(rabbit, vhost) == []


def test_run_refuses_prefetch_zero_naming_the_table_path(tmp_path: Path) -> None:
    topology = tmp_path / "topology.toml"
    topology.write_text(
        '[exchanges.jobs]\ntype = "direct"\n\n[queues.work]\nprefetch = 0\n'
        'bindings = [{ exchange = "jobs", routing_key = "work" }]\n'
    )
    result = run_cli(
        "run", WORK, "--topology", str(topology), "--url", "amqp://guest:guest@127.0.0.1:1/"
    )
    assert result.returncode == 1
    assert_no_traceback(result.stderr)
    assert str(topology) in result.stderr
    assert "queues.work.prefetch" in result.stderr
    assert "prefetch 0" in result.stderr


def test_publish_to_an_unreachable_broker_masks_the_password() -> None:
    result = run_cli("publish", "jobs", "work", "{}", "--url", "amqp://app:s3cret@127.0.0.1:1/")
    assert result.returncode == 1
    assert_no_traceback(result.stderr)
    assert result.stderr.startswith("error: cannot connect to amqp://app:***@127.0.0.1:1/")
    assert "s3cret" not in result.stderr + result.stdout


# -- 8. rabbitflow publish --------------------------------------------------------------------


def test_publish_command_delivers_body_content_type_and_headers(
    vhost_url: str, tmp_path: Path
) -> None:
    # Given the work topology declared
    topology = work_topology(tmp_path)
    declared = run_cli("topology", "declare", str(topology), "--url", vhost_url)
    assert declared.returncode == 0, declared.stderr

    # When a JSON body and a text body are published from the command line
    sent_json = run_cli(
        "publish", "jobs", "work", '{"n": 1}', "-H", "tenant=acme", "--url", vhost_url
    )
    sent_text = run_cli(
        "publish", "jobs", "work", "hello", "--raw", "--message-id", "greeting", "--url", vhost_url
    )

    # Then both arrive with their content types
    assert sent_json.returncode == 0, sent_json.stderr
    assert sent_text.returncode == 0, sent_text.stderr
    assert "to exchange 'jobs' with routing key 'work'" in sent_json.stdout
    first, second = drain(vhost_url, "work")
    assert json.loads(first.body) == {"n": 1}
    assert first.content_type == "application/json"
    assert first.headers["tenant"] == "acme"
    assert first.message_id
    assert (second.body, second.content_type, second.message_id) == (
        b"hello",
        "text/plain",
        "greeting",
    )


def test_publish_command_fails_on_an_unroutable_message(vhost_url: str, tmp_path: Path) -> None:
    declared = run_cli("topology", "declare", str(work_topology(tmp_path)), "--url", vhost_url)
    assert declared.returncode == 0, declared.stderr

    result = run_cli("publish", "jobs", "nowhere", "{}", "--url", vhost_url)

    assert result.returncode == 1
    assert_no_traceback(result.stderr)
    assert result.stderr.strip().splitlines() == [
        "error: publish to exchange 'jobs' with routing key 'nowhere' failed: "
        "unroutable (no queue bound for this routing key)"
    ]
