#!/usr/bin/env bash
# RabbitMQ 4.0 (Debian trixie's rabbitmq-server, in a chroot) on 127.0.0.1:5690, with its
# management API on 127.0.0.1:15690, for the second pass of the broker tests. Wraps the shared
# ../shared/tools/rabbitmq4.sh (read-only, beside the clone): builds the chroot the first time
# (~85 s), starts the node (~5 s), does nothing when both ports answer.
#
# The management plugin is what makes the pass fast: the test fixtures create a vhost per test
# over HTTP in ~60 ms, against ~3 s for three rabbitmqctl calls (an Erlang VM each). The tool
# rewrites rabbitmq.conf at every start but leaves conf.d/ and enabled_plugins alone, so the
# listener goes in conf.d/ (the AMQP port + 10000, the fixtures' convention; 15672 is the
# system broker's).
set -euo pipefail
cd "$(dirname "$0")/../.."
tool=${RF_RMQ4_TOOL:-../shared/tools/rabbitmq4.sh}
root=${RMQ4_ROOT:-/var/tmp/rabbitmq4/trixie}
port=${RF_RMQ4_PORT:-5690}
api=$((port + 10000))
label=${RF_RMQ4_LABEL:-RabbitMQ 4.0}
if [ ! -x "$tool" ]; then
  echo "$label: $tool is missing; its pass cannot run" >&2
  exit 1
fi
up() { (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; }
api_up() { (exec 3<>/dev/tcp/127.0.0.1/$api) 2>/dev/null; }
with_management() {
  mkdir -p "$root/etc/rabbitmq/conf.d"
  printf 'management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = %s\n' "$api" \
    > "$root/etc/rabbitmq/conf.d/90-rabbitflow-management.conf"
  echo '[rabbitmq_management].' > "$root/etc/rabbitmq/enabled_plugins"
}
if up && api_up; then echo "$label answers on 127.0.0.1:$port (management on $api)"; exit 0; fi
if [ ! -x "$root/usr/sbin/rabbitmqctl" ]; then
  "$tool" start   # builds the chroot, then starts the node once without the plugin
fi
if up; then "$tool" stop; fi
with_management
"$tool" start
for _ in $(seq 1 60); do
  if up && api_up && "$tool" ctl -q await_startup >/dev/null 2>&1; then
    echo "$label is up (management on 127.0.0.1:$api)"; exit 0
  fi
  sleep 1
done
if up; then
  echo "$label is up, but its management API does not answer on $api:" \
    "its pass makes vhosts with rabbitmqctl (slower)" >&2
  exit 0
fi
echo "$label did not answer on 127.0.0.1:$port" >&2
exit 1
