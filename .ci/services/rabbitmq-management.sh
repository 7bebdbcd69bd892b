#!/usr/bin/env bash
# The management HTTP API of the broker on 127.0.0.1:5672, for `rabbitflow topology plan`'s
# tests (bindings and policies are visible only there). Idempotent: enables the plugin on the
# running node if it is off (no restart), then waits until 127.0.0.1:15672 answers.
set -euo pipefail

api_up() { (exec 3<>/dev/tcp/127.0.0.1/15672) 2>/dev/null; }

if api_up; then echo "RabbitMQ management answers on 127.0.0.1:15672"; exit 0; fi
echo "enabling rabbitmq_management"
rabbitmq-plugins enable rabbitmq_management >/dev/null
for _ in $(seq 1 60); do
  if api_up; then echo "RabbitMQ management is up"; exit 0; fi
  sleep 1
done
echo "the management API did not answer on 127.0.0.1:15672 within 60 s" >&2
exit 1
