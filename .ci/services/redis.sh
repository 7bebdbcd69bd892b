#!/usr/bin/env bash
# Redis on 127.0.0.1:6379 for the idempotency store tests: started if down (installed from
# Debian if missing), then waited for until it answers PING. Idempotent.
set -euo pipefail

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

if command -v redis-cli >/dev/null 2>&1 && redis_up; then
  echo "Redis answers on 127.0.0.1:6379"; exit 0
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server
fi
mkdir -p /var/lib/redis /var/log/redis
if ! redis_up; then
  echo "starting redis-server"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
for _ in $(seq 1 30); do
  if redis_up; then echo "Redis is up"; exit 0; fi
  sleep 1
done
echo "Redis did not answer on 127.0.0.1:6379 within 30 s" >&2
exit 1
