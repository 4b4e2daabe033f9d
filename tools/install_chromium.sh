#!/usr/bin/env bash
# A real headless browser for the test that loads the service's /docs page with the network cut off
# (tests/test_service.py): Debian's chromium, installed once per machine. Nothing else uses it.
set -euo pipefail
if command -v chromium >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "tools/install_chromium.sh: chromium is missing; install it (Debian: sudo apt-get install chromium)" >&2
    exit 1
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }
