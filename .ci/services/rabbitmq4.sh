#!/usr/bin/env bash
# RabbitMQ 4.0 (Debian trixie's rabbitmq-server, in a chroot) on 127.0.0.1:5690, for the second
# pass of the broker tests. Wraps the shared ../shared/tools/rabbitmq4.sh (read-only, beside
# the clone): builds the chroot the first time (~85 s), starts the node (~5 s), does nothing
# when it answers.
set -euo pipefail
cd "$(dirname "$0")/../.."
tool=${RF_RMQ4_TOOL:-../shared/tools/rabbitmq4.sh}
if [ ! -x "$tool" ]; then
  echo "rabbitmq4: $tool is missing; the RabbitMQ 4.0 pass cannot run" >&2
  exit 1
fi
up() { (exec 3<>/dev/tcp/127.0.0.1/5690) 2>/dev/null; }
if up; then echo "RabbitMQ 4.0 answers on 127.0.0.1:5690"; exit 0; fi
"$tool" start
for _ in $(seq 1 60); do
  if up && "$tool" ctl -q await_startup >/dev/null 2>&1; then echo "RabbitMQ 4.0 is up"; exit 0; fi
  sleep 1
done
echo "RabbitMQ 4.0 did not answer on 127.0.0.1:5690" >&2
exit 1
