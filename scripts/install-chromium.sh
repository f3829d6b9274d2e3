#!/usr/bin/env bash
# Install headless Chromium for the report browser test (Debian/Ubuntu, needs root).
# Does nothing when chromium is already on PATH.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
# One install at a time (each of the test suite's workers, pytest -n, may ask for it):
# a lock on this script's own file, which needs no path of its own.
exec 9<"$0"
flock 9
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-chromium: chromium missing and not root; run: sudo apt-get install -y chromium" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
command -v chromium
