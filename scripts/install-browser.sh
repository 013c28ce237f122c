#!/usr/bin/env bash
# Installs headless Chromium + chromedriver (Debian packages) for tests/browser_check.py.
# Idempotent: does nothing when both binaries are already present. Without root or sudo it only
# prints a note and exits 0, so the browser tests skip instead of failing.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1; then
  SUDO="sudo"
else
  echo "install-browser: not root and no sudo; chromium not installed (browser tests will skip)"
  exit 0
fi
$SUDO apt-get update -qq
# stdout is dropped because dpkg prints one line per unpacked package even with -qq; errors stay on stderr.
$SUDO env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
echo "install-browser: $(/usr/bin/chromium --version 2>/dev/null || echo 'chromium installed')"
