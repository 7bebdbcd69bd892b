#!/usr/bin/env bash
# Headless Chromium for the console's browser tests (tests/test_console_browser.py).
# Idempotent: installs Debian's chromium package when /usr/bin/chromium is missing, then checks
# that it starts headless. Nothing keeps running: every test starts its own browser.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [ ! -x "$CHROMIUM" ]; then
  echo "installing chromium"
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    chromium fonts-dejavu-core >/dev/null
fi

profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
# As root Chromium refuses to start without --no-sandbox; the other flags keep it off the network.
dom="$("$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-background-networking \
  --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile" \
  --dump-dom 'data:text/html,<p>ok</p>' 2>/dev/null || true)"
if [[ "$dom" == *"<p>ok</p>"* ]]; then
  echo "chromium answers: $("$CHROMIUM" --version 2>/dev/null)"
else
  echo "chromium does not start headless" >&2
  exit 1
fi
