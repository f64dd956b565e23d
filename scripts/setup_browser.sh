#!/usr/bin/env bash
# A headless Chromium for the browser tests (tests/test_explorer.py): Debian's chromium and
# chromium-driver, and selenium pointed at them (nothing is downloaded at test time). Idempotent:
# does nothing when both executables and selenium are already there.
#
# Where the browser cannot be installed (no root or sudo, no apt, no network) it says why and exits 0:
# the browser tests then skip, naming what is missing. ULTRA_FAST_REQUIRE_BROWSER=1 makes that an error.
set -uo pipefail

CHROMIUM=${ULTRA_FAST_CHROMIUM:-/usr/bin/chromium}
CHROMEDRIVER=${ULTRA_FAST_CHROMEDRIVER:-/usr/bin/chromedriver}
PYTHON=${PYTHON:-python3}

give_up() {
    echo "setup_browser.sh: $1; the browser tests will skip" >&2
    [ "${ULTRA_FAST_REQUIRE_BROWSER:-0}" = 1 ] && exit 1
    exit 0
}

if [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; then
    echo "chromium: $("$CHROMIUM" --version 2>/dev/null || echo present)"
else
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || give_up "need root (or sudo) to apt-get install chromium chromium-driver"
        SUDO="sudo -n"
    fi
    command -v apt-get >/dev/null || give_up "no apt-get to install chromium chromium-driver"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq || give_up "apt-get update failed"
    $SUDO apt-get install -y -qq chromium chromium-driver || give_up "apt-get install chromium chromium-driver failed"
fi

if "$PYTHON" -c "import selenium" 2>/dev/null; then
    echo "selenium: $("$PYTHON" -c 'import selenium; print(selenium.__version__)')"
else
    "$PYTHON" -m pip install -q "selenium>=4.10" || give_up "pip install selenium failed"
fi
