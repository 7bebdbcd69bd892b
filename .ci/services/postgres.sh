#!/usr/bin/env bash
# PostgreSQL on 127.0.0.1:5432 for the idempotency store tests, with trust auth for local
# and 127.0.0.1 connections and a database `test`: started if down (installed from Debian if
# missing), then waited for until it accepts connections. Idempotent.
set -euo pipefail

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  echo "installing postgresql"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
fi
version="$(ls /etc/postgresql | sort -V | tail -1)"
hba="/etc/postgresql/${version}/main/pg_hba.conf"
if ! grep -Eq '^host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$hba"; then
  # Test databases only: the tests connect as postgres without a password.
  printf 'local all all trust\nhost all all 127.0.0.1/32 trust\n' | cat - "$hba" > "$hba.new"
  mv "$hba.new" "$hba"
  if pg_up; then pg_ctlcluster --skip-systemctl-redirect "$version" main reload; fi
fi
if ! pg_up; then
  echo "starting postgresql ${version}"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
fi
for _ in $(seq 1 60); do
  if pg_up; then break; fi
  sleep 1
done
if ! pg_up; then
  echo "PostgreSQL did not accept connections on 127.0.0.1:5432 within 60 s" >&2
  exit 1
fi
if ! psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1; then
  psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE test"
fi
echo "PostgreSQL is up (database test)"
