#!/usr/bin/env bash
# A headless Chromium for the browser tests (tests/test_explorer.py): Debian's chromium and
# chromium-driver, and selenium pointed at them (nothing is downloaded at test time). Idempotent:
# does nothing when both executables and selenium are already there. Needs root (or sudo) for apt.
set -euo pipefail

CHROMIUM=${ULTRA_FAST_CHROMIUM:-/usr/bin/chromium}
CHROMEDRIVER=${ULTRA_FAST_CHROMEDRIVER:-/usr/bin/chromedriver}
PYTHON=${PYTHON:-python3}

if [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; then
    echo "chromium: $("$CHROMIUM" --version 2>/dev/null || echo present)"
else
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null; then SUDO="sudo"; else
            echo "setup_browser.sh: need root (or sudo) to apt-get install chromium chromium-driver" >&2; exit 1
        fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq chromium chromium-driver
fi

if "$PYTHON" -c "import selenium" 2>/dev/null; then
    echo "selenium: $("$PYTHON" -c 'import selenium; print(selenium.__version__)')"
else
    "$PYTHON" -m pip install -q "selenium>=4.10"
fi
