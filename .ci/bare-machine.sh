#!/usr/bin/env bash
# The README's test command on a machine with only RabbitMQ 3.10 from Debian: no management API,
# no Redis, no PostgreSQL, no Chromium (docs/development.md#the-bare-machine-check).
#
# CI has every service, so this run hides them: each one behind a closed port (or a missing
# path) through the one variable the tests read (tests/support/services.py), with CI unset,
# as on a newcomer's machine. It runs the test modules that use those services, and collects
# the whole suite, then expects exit 0 where every skip names a hidden service and each hidden
# service made at least one test skip (else nothing was hidden and the check proves nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .ci/logs
started=$SECONDS

closed=$(.venv/bin/python -c '
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()')
hidden=(
  env -u CI -u RABBITFLOW_TEST_URL -u RABBITFLOW_TEST_CTL
  "RABBITFLOW_TEST_MANAGEMENT_URL=http://127.0.0.1:$closed/"
  "RABBITFLOW_MANAGEMENT_URL=http://127.0.0.1:$closed/"
  "RABBITFLOW_TEST_REDIS=redis://127.0.0.1:$closed/0"
  "RABBITFLOW_TEST_POSTGRES=postgresql://postgres@127.0.0.1:$closed/test"
  "RABBITFLOW_TEST_CHROMIUM=/nonexistent/chromium"
)

# Every module that needs one of them: through tests/support/services.py or stores.py, the management
# marker, or the services' own clients.
mapfile -t modules < <(
  grep -rlE 'tests\.support\.(services|stores)|mark\.management|redis\.|psycopg|playwright|:15672|management_for' \
    tests --include='test_*.py' | sort
)
echo "bare machine: ${#modules[@]} modules, services hidden behind 127.0.0.1:$closed"

# Nothing may fail to import without the services (a module-level connection, a missing extra).
"${hidden[@]}" .venv/bin/python -m pytest --collect-only -q -n 0 -p no:cacheprovider > .ci/logs/bare-collect.log \
  || { cat .ci/logs/bare-collect.log; echo "bare machine: collection failed" >&2; exit 1; }

report=.ci/logs/bare-machine.xml
"${hidden[@]}" .venv/bin/python -m pytest -p no:cacheprovider --junitxml="$report" "${modules[@]}"

.venv/bin/python - "$report" <<'PY'
import re
import sys
import xml.etree.ElementTree as ET

# What a skip must name: one of the hidden services.
HIDDEN = {
    "Redis": r"^no Redis on ",
    "PostgreSQL": r"^no PostgreSQL on ",
    "the management API": r"management API does not answer",
    "Chromium": r"^/nonexistent/chromium is missing",
}
skips = [
    (case.get("classname", "") + "::" + case.get("name", ""), skipped.get("message", ""))
    for case in ET.parse(sys.argv[1]).iter("testcase")
    for skipped in case.findall("skipped")
]
# junitxml prefixes the reason with "Skipped: " in some versions.
reasons = [(test, re.sub(r"^Skipped: ", "", message)) for test, message in skips]
stray = [f"{test}: {reason}" for test, reason in reasons
         if not any(re.search(p, reason) for p in HIDDEN.values())]
unseen = [name for name, p in HIDDEN.items() if not any(re.search(p, r) for _, r in reasons)]
if stray:
    sys.exit("bare machine: skips that name no hidden service:\n  " + "\n  ".join(stray))
if unseen:
    sys.exit("bare machine: no test skipped for lack of " + ", ".join(unseen) + " (not hidden?)")
print(f"bare machine: {len(reasons)} skips, each naming a hidden service")
PY
echo "bare machine: passed in $((SECONDS - started)) s"
