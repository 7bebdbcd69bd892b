#!/usr/bin/env bash
# The 3-node RabbitMQ 3.10 cluster of tests/cluster (rfc1..rfc3@localhost, 127.0.0.1:5681-5683).
# Wraps the shared ../shared/tools/cluster.sh (read-only, beside the clone): it forms the
# cluster from nothing (~22 s), restarts stopped nodes, and does nothing when all three run.
set -euo pipefail
cd "$(dirname "$0")/../.."
tool=${RF_CLUSTER_TOOL:-../shared/tools/cluster.sh}
if [ ! -x "$tool" ]; then
  echo "cluster: $tool is missing; tests/cluster cannot run" >&2
  exit 1
fi
up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if up 5681 && up 5682 && up 5683; then
  echo "cluster answers on 127.0.0.1:5681-5683"
  exit 0
fi
"$tool" start
for _ in $(seq 1 60); do
  if up 5681 && up 5682 && up 5683; then echo "cluster is up"; exit 0; fi
  sleep 1
done
echo "cluster did not answer on 127.0.0.1:5681-5683" >&2
exit 1
