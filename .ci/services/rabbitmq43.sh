#!/usr/bin/env bash
# RabbitMQ 4.3 (Debian forky's rabbitmq-server, in a chroot) on 127.0.0.1:5691, with its
# management API on 127.0.0.1:15691, for the third pass of the broker tests: rabbitmq4.sh
# pointed at the shared ../shared/tools/rabbitmq43.sh, its chroot and its ports.
set -euo pipefail
cd "$(dirname "$0")/../.."
export RF_RMQ4_TOOL=${RF_RMQ4_TOOL_43:-../shared/tools/rabbitmq43.sh}
export RMQ4_ROOT=${RMQ43_ROOT:-/var/tmp/rabbitmq4/forky}
export RF_RMQ4_PORT=5691 RF_RMQ4_LABEL="RabbitMQ 4.3"
exec bash .ci/services/rabbitmq4.sh
