"""``rabbitflow console`` over HTTP against a real broker, one fresh vhost per test.

What a browser does is in tests/test_console_browser.py; here each page and action is driven
with an HTTP client, so the safety rules (token, CSRF, host, read-only, escaping) are checked
request by request."""

from __future__ import annotations

import base64
import contextlib
import html
import json
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aio_pika
import httpx
import pytest
import structlog
from click.testing import CliRunner

from rabbitflow import _headers as h
from rabbitflow._broker_version import BrokerVersion
from rabbitflow.cli import _register, cli
from rabbitflow.console import ConsoleSettings, create_app
from rabbitflow.console._inventory import oldest_due
from rabbitflow.console._reads import reads_are_counted, reads_left
from rabbitflow.dlq import DeadLetter
from rabbitflow.topology import Topology, derive, parse_topology
from rabbitflow.topology._declare import declare
from tests.support.broker import Rabbit

pytestmark = pytest.mark.broker

Q = "billing.order-created"
DLQ = f"{Q}.dlq"
DECLINED = "app.billing.PaymentDeclined"
TIMEOUT = "app.clients.UpstreamTimeout"
TOPOLOGY = f"""
[exchanges.orders]
type = "topic"

[queues."{Q}"]
bindings = [{{ exchange = "orders", routing_key = "order.created" }}]
retry = {{ delays = ["5s", "10m"], max_attempts = 3 }}

[queues."audit.all"]
queue_type = "classic"
bindings = [{{ exchange = "orders", routing_key = "#" }}]
retry = false
"""

Client = Callable[..., Awaitable[httpx.AsyncClient]]


def failed(number: int, error_type: str | None, body: bytes | None = None) -> aio_pika.Message:
    """A message the way the worker dead-letters it."""
    headers: dict[str, Any] = {
        h.ATTEMPT: 3,
        h.ORIGIN_QUEUE: Q,
        h.FIRST_FAILED_AT: (datetime.now(UTC) - timedelta(minutes=number)).isoformat(),
        h.ERROR_STACK: 'Traceback (most recent call last):\n  File "app.py", line 3\n',
        "tenant": "acme",
    }
    if error_type is not None:
        headers[h.ERROR_TYPE] = error_type
        headers[h.ERROR_MESSAGE] = f"{error_type.rsplit('.', 1)[-1]} for order {number}"
    return aio_pika.Message(
        body or f'{{"order_id": {number}}}'.encode(),
        headers=headers,
        content_type="application/json",
        message_id=f"m-{number}",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def dead_letter(url: str, *messages: aio_pika.Message) -> None:
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        dlx = await channel.get_exchange("dlx")
        for message in messages:
            await dlx.publish(message, routing_key=Q)


async def publish(url: str, queue: str, *messages: aio_pika.Message) -> None:
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        for message in messages:
            await channel.default_exchange.publish(message, routing_key=queue)


async def message_ids(url: str, queue: str) -> list[str | None]:
    """Take every message off ``queue`` and return their ids, in order."""
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        source = await channel.get_queue(queue)
        ids: list[str | None] = []
        while (message := await source.get(no_ack=True, fail=False)) is not None:
            ids.append(message.message_id)
        return ids


@pytest.fixture
async def topology(vhost_url: str) -> Topology:
    parsed = parse_topology(TOPOLOGY, "topology.toml")
    async with await aio_pika.connect(vhost_url) as connection:
        await declare(connection, derive(parsed))
    return parsed


@pytest.fixture
async def client(vhost_url: str, topology: Topology) -> AsyncIterator[Client]:
    """``await client(**settings)``: an HTTP client of a console on the test's vhost."""
    opened: list[tuple[httpx.AsyncClient, Any]] = []

    async def make(**settings: Any) -> httpx.AsyncClient:
        app = create_app(ConsoleSettings(url=vhost_url, topology=topology, **settings))
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8025"
        )
        opened.append((http, app))
        return http

    yield make
    for http, app in opened:
        await http.aclose()
        await app.state.console.link.close()


def csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "the page has no action form"
    return found.group(1)


async def test_overview_shows_every_queue_its_tiers_and_its_dlq(
    client: Client, vhost_url: str
) -> None:
    # Given: 2 ready messages in Q, one waiting in its 10m tier, 3 in its DLQ
    await publish(vhost_url, Q, aio_pika.Message(b"1"), aio_pika.Message(b"2"))
    await publish(vhost_url, f"{Q}.retry.10m", failed(1, TIMEOUT))
    await dead_letter(vhost_url, *(failed(n, DECLINED) for n in range(3)))
    http = await client()

    # When
    page = (await http.get("/")).text

    # Then
    row = _row(page, Q)
    assert re.search(r'class="num">2</td>', row), row
    assert re.search(
        r'data-tier="billing.order-created.retry.10m">\s*<b>10m</b>\s*'
        r'<span class="count">1</span> <span class="due"',
        row,
    ), row
    assert f'href="/dlq/{Q}">3</a>' in row
    assert "audit.all" in page
    assert "no retries" in _row(page, "audit.all")
    assert '<pre class="mermaid">flowchart LR' in page
    assert "amqp://guest:***@" in page
    assert ":guest@" not in page


async def test_the_queue_table_refreshes_on_its_own_url(client: Client, vhost_url: str) -> None:
    http = await client()
    before = (await http.get("/queues")).text
    await dead_letter(vhost_url, failed(1, DECLINED))
    after = (await http.get("/queues")).text
    assert f'href="/dlq/{Q}">0</a>' in before
    assert f'href="/dlq/{Q}">1</a>' in after
    assert "<html" not in after  # a fragment, swapped in by console.js


async def test_dead_letters_are_grouped_by_error_type(client: Client, vhost_url: str) -> None:
    await dead_letter(
        vhost_url, failed(1, DECLINED), failed(2, TIMEOUT), failed(3, DECLINED), failed(4, None)
    )
    http = await client()

    page = (await http.get(f"/dlq/{Q}")).text

    assert 'id="reads-warning"' not in page  # RabbitMQ 3.x: no default delivery limit
    groups = dict(
        re.findall(r'<tr data-error-type="([^"]*)">.*?class="num">(\d+)</td>', page, re.S)
    )
    assert groups == {DECLINED: "2", TIMEOUT: "1", "": "1"}
    filtered = (await http.get(f"/dlq/{Q}", params={"error_type": TIMEOUT})).text
    assert "m-2" in filtered
    assert "m-1" not in _messages(filtered)
    unset = (await http.get(f"/dlq/{Q}", params={"error_type": ""})).text  # "any" in the form
    assert re.findall(r">(m-\d)</a>", _messages(unset)) == ["m-1", "m-2", "m-3", "m-4"]
    none = (await http.get(f"/dlq/{Q}", params={"error_type": "(none)"})).text
    assert re.findall(r">(m-\d)</a>", _messages(none)) == ["m-4"]
    older = (await http.get(f"/dlq/{Q}", params={"older_than": "150s"})).text
    assert "m-1" not in _messages(older)
    assert "m-3" in _messages(older)
    text = (await http.get(f"/dlq/{Q}", params={"text": "order 4"})).text
    assert re.findall(r">(m-\d)</a>", _messages(text)) == []  # m-4 has no error message
    text = (await http.get(f"/dlq/{Q}", params={"text": "for order 3"})).text
    assert re.findall(r">(m-\d)</a>", _messages(text)) == ["m-3"]


async def test_the_message_view_shows_headers_body_and_stack_escaped(
    client: Client, vhost_url: str
) -> None:
    body = b'{"name": "<script>alert(1)</script>"}'
    await dead_letter(vhost_url, failed(1, DECLINED, body=body))
    http = await client()

    page = (await http.get(f"/dlq/{Q}/message/id:m-1")).text

    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert f"{len(body)} bytes" in page
    assert "Traceback (most recent call last):" in page
    assert "<th>tenant</th><td><code>acme</code>" in page


async def test_replay_of_a_group_asks_first_then_moves_only_that_group(
    client: Client, vhost_url: str
) -> None:
    await dead_letter(vhost_url, failed(1, DECLINED), failed(2, TIMEOUT), failed(3, DECLINED))
    http = await client()
    token = csrf((await http.get(f"/dlq/{Q}")).text)
    form = {"csrf": token, "scope": "group", "error_type": DECLINED}

    # When: the first POST is the confirmation step
    asked = await http.post(f"/actions/replay/{Q}", data=form)
    assert asked.status_code == 200
    assert "This moves <b>2</b> messages" in asked.text
    assert await _dlq_depth(http) == 3  # nothing moved yet

    # When: confirmed
    with structlog.testing.capture_logs() as logs:
        done = await http.post(f"/actions/replay/{Q}", data={**form, "confirm": "yes"})

    # Then: redirected to the DLQ page with the result line; the audit line is written
    assert done.status_code == 303
    result = (await http.get(done.headers["location"])).text
    assert f"moved 2 messages from {DLQ} to {Q}; 1 left in {DLQ}" in result
    audit = [e for e in logs if e["event"] == "console action"]
    assert audit == [
        {
            "event": "console action",
            "log_level": "info",
            "action": "replay",
            "scope": "group",
            "queue": Q,
            "dlq": DLQ,
            "error_type": DECLINED,
            "selected": None,
            "moved": 2,
            "left": 1,
            "client": "127.0.0.1",
        }
    ]
    assert await message_ids(vhost_url, Q) == ["m-1", "m-3"]
    assert await message_ids(vhost_url, DLQ) == ["m-2"]


async def test_a_group_is_its_exact_error_type(client: Client, vhost_url: str) -> None:
    # A bare name would match any module's class of that name in `dlq replay --error-type`.
    await dead_letter(
        vhost_url, failed(1, "KeyError"), failed(2, "app.errors.KeyError"), failed(3, "KeyError")
    )
    http = await client(limit=2)  # reads 2 of the 3: the count is a lower bound
    form = {"csrf": csrf((await http.get(f"/dlq/{Q}")).text), "scope": "group"}
    form["error_type"] = "KeyError"

    asked = await http.post(f"/actions/replay/{Q}", data=form)
    await http.post(f"/actions/replay/{Q}", data={**form, "confirm": "yes"})

    assert "This moves at least <b>1</b> message" in asked.text
    assert await message_ids(vhost_url, Q) == ["m-1", "m-3"]
    assert await message_ids(vhost_url, DLQ) == ["m-2"]


async def test_replay_of_selected_messages_keeps_the_others_in_order(
    client: Client, vhost_url: str
) -> None:
    await dead_letter(vhost_url, *(failed(n, DECLINED) for n in range(1, 6)))
    http = await client()
    token = csrf((await http.get(f"/dlq/{Q}")).text)
    form: dict[str, Any] = {"csrf": token, "scope": "selected", "key": ["id:m-2", "id:m-4"]}

    asked = await http.post(f"/actions/replay/{Q}", data=form)
    assert "This moves <b>2</b> messages" in asked.text
    done = await http.post(
        f"/actions/replay/{Q}",
        data={**form, "confirm": "yes"},
    )

    assert done.status_code == 303
    assert await message_ids(vhost_url, Q) == ["m-2", "m-4"]
    assert await message_ids(vhost_url, DLQ) == ["m-1", "m-3", "m-5"]


async def test_replay_of_the_group_without_error_type(client: Client, vhost_url: str) -> None:
    await dead_letter(vhost_url, failed(1, None), failed(2, DECLINED), failed(3, None))
    http = await client()
    token = csrf((await http.get(f"/dlq/{Q}")).text)
    form = {"csrf": token, "scope": "group", "error_type": "", "confirm": "yes"}

    done = await http.post(f"/actions/replay/{Q}", data=form)

    assert done.status_code == 303
    assert await message_ids(vhost_url, Q) == ["m-1", "m-3"]
    assert await message_ids(vhost_url, DLQ) == ["m-2"]


async def test_replay_all_moves_every_message_in_order(client: Client, vhost_url: str) -> None:
    await dead_letter(vhost_url, failed(1, None), failed(2, DECLINED), failed(3, TIMEOUT))
    http = await client()
    form = {"csrf": csrf((await http.get(f"/dlq/{Q}")).text), "scope": "all"}

    asked = await http.post(f"/actions/replay/{Q}", data=form)
    done = await http.post(f"/actions/replay/{Q}", data={**form, "confirm": "yes"})

    assert "This moves <b>3</b> messages" in asked.text
    result = (await http.get(done.headers["location"])).text
    assert f"moved 3 messages from {DLQ} to {Q}<" in result
    assert await message_ids(vhost_url, Q) == ["m-1", "m-2", "m-3"]


async def test_purge_asks_first_then_empties_the_dlq(client: Client, vhost_url: str) -> None:
    await dead_letter(vhost_url, failed(1, DECLINED), failed(2, TIMEOUT))
    http = await client()
    token = csrf((await http.get(f"/dlq/{Q}")).text)

    asked = await http.post(f"/actions/purge/{Q}", data={"csrf": token})
    assert "This deletes <b>2</b> messages" in asked.text
    assert await _dlq_depth(http) == 2
    done = await http.post(f"/actions/purge/{Q}", data={"csrf": token, "confirm": "yes"})

    result = (await http.get(done.headers["location"])).text
    assert f"purged 2 messages from {DLQ}" in result
    assert await _dlq_depth(http) == 0


async def test_actions_without_the_pages_csrf_value_are_refused(
    client: Client, vhost_url: str
) -> None:
    await dead_letter(vhost_url, failed(1, DECLINED))
    http = await client()
    token = csrf((await http.get(f"/dlq/{Q}")).text)
    confirm = {"scope": "all", "confirm": "yes"}

    forged = await http.post(f"/actions/replay/{Q}", data={**confirm, "csrf": "guess"})
    cross = await http.post(
        f"/actions/purge/{Q}",
        data={"csrf": token, "confirm": "yes"},
        headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
    )

    assert (forged.status_code, cross.status_code) == (403, 403)
    assert await _dlq_depth(http) == 1


async def test_a_token_is_needed_on_every_request(client: Client) -> None:
    http = await client(token="s3cret-token")

    assert (await http.get("/")).status_code == 401
    assert (await http.get("/static/console.css")).status_code == 401
    assert (await http.get("/", headers={"Authorization": "Bearer wrong"})).status_code == 401
    assert (
        await http.get("/", headers={"Authorization": "Bearer s3cret-token"})
    ).status_code == 200

    # Opening /?token= once sets a cookie and takes the token out of the address bar.
    login = await http.get(f"/dlq/{Q}?token=s3cret-token&text=x")
    assert login.status_code == 303
    assert login.headers["location"] == f"/dlq/{Q}?text=x"
    cookie = login.headers["set-cookie"]
    assert "s3cret-token" not in cookie
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    page = await http.get("/")
    assert page.status_code == 200
    assert "s3cret-token" not in page.text


async def test_an_unknown_host_header_is_refused_on_loopback(client: Client) -> None:
    # A web page that rebinds its own name to 127.0.0.1 still sends its name as Host.
    http = await client()
    assert (await http.get("/", headers={"Host": "evil.example"})).status_code == 421
    assert (await http.get("/", headers={"Host": "localhost:8025"})).status_code == 200


async def test_read_only_offers_no_action(client: Client, vhost_url: str) -> None:
    await dead_letter(vhost_url, failed(1, DECLINED))
    http = await client(read_only=True)

    page = (await http.get(f"/dlq/{Q}")).text
    posted = await http.post(f"/actions/purge/{Q}", data={"confirm": "yes"})

    assert '<form method="post"' not in page
    assert "Replay" not in page
    assert "read-only" in page
    assert posted.status_code in (404, 405)
    assert await _dlq_depth(http) == 1


async def test_the_on_call_user_of_operations_md_is_enough(
    rabbit: Rabbit, vhost: str, topology: Topology, vhost_url: str
) -> None:
    # Given: the on-call user of docs/operations.md (read on DLQs only, write on amq.default)
    user = f"oncall-{vhost}"
    rabbit.admin.add_user(user, "oncall-secret")
    try:
        rabbit.admin.set_permissions(vhost, user, "^$", "^amq\\.default$", "^.*\\.dlq$")
        await publish(vhost_url, f"{Q}.retry.10m", failed(1, TIMEOUT))
        await dead_letter(vhost_url, failed(2, DECLINED))
        url = vhost_url.replace("guest:guest@", f"{user}:oncall-secret@")
        app = create_app(ConsoleSettings(url=url, topology=topology))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            # When: the overview (its tiers cannot be read) and a replay of the DLQ
            page = (await http.get("/")).text
            token = csrf((await http.get(f"/dlq/{Q}")).text)
            form = {"csrf": token, "scope": "all", "confirm": "yes"}
            done = await http.post(f"/actions/replay/{Q}", data=form)
            result = (await http.get(done.headers["location"])).text
        await app.state.console.link.close()
    finally:
        rabbit.forget_user(user)

    # Then: counts are shown, the due time is said to be unreadable, the replay works
    row = _row(page, Q)
    assert f"no read permission on {Q}.retry.10m" in row
    assert f'href="/dlq/{Q}">1</a>' in row
    assert f"moved 1 message from {DLQ} to {Q}" in result
    assert "oncall-secret" not in page + result


async def test_a_queue_outside_the_topology_is_not_served(client: Client) -> None:
    http = await client()
    assert (await http.get("/dlq/other.queue")).status_code == 404


@contextlib.contextmanager
def management_api(answer: list[dict[str, Any]]) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """A stand-in for RabbitMQ's management API on a free port: yields its URL and the
    (path, Authorization header) of each request."""
    seen: list[tuple[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("Authorization", "")))
            body = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", seen
    finally:
        server.shutdown()
        server.server_close()


async def test_unacked_counts_come_from_the_management_api(client: Client, vhost: str) -> None:
    answer = [{"name": Q, "messages_unacknowledged": 7}, {"name": DLQ}]
    with management_api(answer) as (url, seen):
        http = await client(management_url=url)
        page = (await http.get("/")).text
    assert re.search(r'<td class="num"\s*>7</td>', _row(page, Q))
    assert "no count without --management-url" not in page
    path, auth = seen[0]
    assert path.startswith(f"/api/queues/{vhost}?")
    assert auth == "Basic " + base64.b64encode(b"guest:guest").decode()


async def test_an_unreachable_management_api_is_named_and_the_rest_still_shows(
    client: Client,
) -> None:
    http = await client(management_url="http://admin:hunter2@127.0.0.1:1/")
    page = (await http.get("/")).text
    assert "Unacked: management API at http://admin:***@127.0.0.1:1/: ConnectError" in page
    assert "hunter2" not in page
    assert f'href="/dlq/{Q}">0</a>' in page


def test_reads_count_toward_the_delivery_limit_only_on_rabbitmq_4_0_to_4_2_quorum_queues() -> None:
    quorum = {"x-queue-type": "quorum"}
    v3, v4, v42, v43 = (
        BrokerVersion(3, 10, 8),
        BrokerVersion(4, 0, 5),
        BrokerVersion(4, 2),
        BrokerVersion(4, 3, 6),
    )
    assert reads_are_counted(v4, "quorum", quorum)
    assert reads_are_counted(v42, "quorum", quorum)
    assert not reads_are_counted(v43, "quorum", quorum)  # rabbitflow's reads nack: free on 4.3
    assert not reads_are_counted(v3, "quorum", quorum)
    assert not reads_are_counted(None, "quorum", quorum)
    assert not reads_are_counted(v4, "classic", {"x-queue-type": "classic"})
    assert not reads_are_counted(v4, "quorum", {**quorum, "x-delivery-limit": -1})
    assert reads_left({"x-delivery-count": 7}) == 13
    assert reads_left({}) == 20
    assert reads_left({"x-delivery-count": 25}) == 0


def test_oldest_due_of_a_first_retry_is_its_failure_plus_the_delay() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    config = parse_topology(TOPOLOGY).queues[Q]
    head = DeadLetter(
        1,
        "m",
        None,
        None,
        None,
        None,
        {h.ATTEMPT: 2, h.FIRST_FAILED_AT: "2026-01-01T11:59:58+00:00"},
        0,
        "",
        False,
    )
    due = oldest_due(head, config, 5000, now)
    assert due.at == datetime(2026, 1, 1, 12, 0, 3, tzinfo=UTC)
    assert due.estimated


def test_console_refuses_to_listen_beyond_loopback_without_a_token(tmp_path: Any) -> None:
    (tmp_path / "topology.toml").write_text(TOPOLOGY)
    _register()
    result = CliRunner().invoke(
        cli,
        ["console", str(tmp_path / "topology.toml"), "--host", "0.0.0.0"],
        env={"RABBITFLOW_CONSOLE_TOKEN": ""},
    )
    assert result.exit_code == 2
    assert "--host 0.0.0.0 listens beyond this machine: set --token" in result.output
    missing = CliRunner().invoke(cli, ["console", str(tmp_path / "none.toml")])
    assert missing.exit_code == 1
    assert missing.output.startswith("error: topology file")
    assert "Traceback" not in missing.output


def test_a_token_on_the_command_line_is_warned_about_and_the_variable_is_not(
    tmp_path: Any,
) -> None:
    # Any user of the machine can read a command line (ps, /proc/PID/cmdline).
    missing = str(tmp_path / "none.toml")
    _register()
    given = CliRunner().invoke(cli, ["console", missing, "--token", "s3cret"])
    from_env = CliRunner().invoke(
        cli, ["console", missing], env={"RABBITFLOW_CONSOLE_TOKEN": "s3cret"}
    )
    assert given.stderr.splitlines()[0] == (
        "warning: --token is visible to every user of this machine (ps, /proc); "
        "set RABBITFLOW_CONSOLE_TOKEN instead"
    )
    assert "warning" not in from_env.stderr
    assert "s3cret" not in given.stderr + from_env.stderr
    help_text = CliRunner().invoke(cli, ["console", "--help"]).output
    assert "Prefer RABBITFLOW_CONSOLE_TOKEN" in " ".join(help_text.split())


def _row(page: str, queue: str) -> str:
    found = re.search(rf'<tr data-queue="{re.escape(queue)}">(.*?)</tr>', page, re.S)
    assert found, f"no row for {queue}"
    return found.group(1)


def _messages(page: str) -> str:
    return page.split('id="messages"', 1)[1]


async def _dlq_depth(http: httpx.AsyncClient) -> int:
    page = (await http.get("/queues")).text
    found = re.search(rf'href="/dlq/{re.escape(Q)}">(\d+)</a>', page)
    assert found
    return int(found.group(1))


# Message ids are strings a publisher chose: a path separator, escapes, spaces, a query or a
# fragment mark, non-ASCII letters, or all of them at once.
ODD_IDS = ["orders/42", "50%off", "%2F", "two words", "why?", "#7", "über-☃", "a/b%2Fc?d=1&e#f g"]


async def test_every_message_id_opens_its_page_and_can_be_replayed(
    client: Client, vhost_url: str
) -> None:
    # Given: dead letters whose message_ids hold characters that mean something in a URL
    letters = []
    for number, message_id in enumerate(ODD_IDS, start=1):
        letter = failed(number, DECLINED)
        letter.message_id = message_id
        letters.append(letter)
    await dead_letter(vhost_url, *letters)
    http = await client()
    page = (await http.get(f"/dlq/{Q}")).text
    links = dict(
        (html.unescape(text), html.unescape(href))
        for href, text in re.findall(r'class="name"><a href="([^"]+)">([^<]*)</a>', _messages(page))
    )
    assert sorted(links) == sorted(ODD_IDS)

    # When: each message's link is followed, as a browser would
    for message_id, href in links.items():
        shown = await http.get(href)
        # Then: it opens that message's page
        assert shown.status_code == 200, (message_id, href)
        assert f"<code>{html.escape(message_id, quote=False)}</code>" in shown.text

    # When: they are selected and replayed (the checkbox values, as the browser sends them)
    keys = [html.unescape(k) for k in re.findall(r'name="key" value="([^"]+)"', page)]
    form: dict[str, Any] = {"csrf": csrf(page), "scope": "selected", "key": keys[:4]}
    asked = await http.post(f"/actions/replay/{Q}", data=form)
    assert "This moves <b>4</b> messages" in asked.text
    done = await http.post(f"/actions/replay/{Q}", data={**form, "confirm": "yes"})

    # Then: exactly those went back to the queue, ids intact
    assert done.status_code == 303
    assert await message_ids(vhost_url, Q) == ODD_IDS[:4]
    assert await message_ids(vhost_url, DLQ) == ODD_IDS[4:]


async def test_an_unknown_message_key_is_a_404_naming_it(client: Client, vhost_url: str) -> None:
    await dead_letter(vhost_url, failed(1, DECLINED))
    http = await client()
    missing = await http.get(f"/dlq/{Q}/message", params={"key": "id:orders/43"})
    assert missing.status_code == 404
    assert "id:orders/43" in missing.text
    older = await http.get(f"/dlq/{Q}/message/id:m-1")  # links of earlier releases still open
    assert older.status_code == 200
