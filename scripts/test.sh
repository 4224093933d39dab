#!/usr/bin/env bash
# The test suite on a fresh machine: install (with the test and Slicer-MRML extras), then pytest.
# Then the web tier (SKIP_WEB=1 skips it): the trame-slicer app in its own venv .venv-web
# (trame-slicer 2.0.0 pins slicer-core 5.11.x; the main venv has 5.12.x), with an
# end-to-end test in headless Chromium (Debian's chromium, installed with apt-get as root).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRAS="[test,slicer]" bash scripts/setup_env.sh
status=0
.venv/bin/python -m pytest Testing/Python -q "$@" || status=$?

web_status=0
if [ "${SKIP_WEB:-0}" != 1 ]; then
    started=$SECONDS
    PYTHON=${PYTHON:-python3}
    WPIP=(.venv-web/bin/python -m pip install -q --disable-pip-version-check)
    [ -x .venv-web/bin/python ] || "$PYTHON" -m venv .venv-web
    # torch first (as in setup_env.sh), then the package with the web extra.
    .venv-web/bin/python -c "import torch" 2>/dev/null || "${WPIP[@]}" ${TORCH_SPEC:-torch==2.13.0}
    "${WPIP[@]}" -e ".[test,web]"
    # The browser: Debian's chromium and the playwright package, which drives it
    # (never 'playwright install': it would download a browser). Without them the
    # browser test is skipped and says why.
    if ! command -v chromium >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt_log=$(mktemp)
            if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >"$apt_log" 2>&1; then
                tail -n 5 "$apt_log"
                echo "test.sh: could not install chromium: the browser test will be skipped"
            fi
            rm -f "$apt_log"
        else
            echo "test.sh: chromium is not installed and this is not root: the browser test will be skipped"
        fi
    fi
    "${WPIP[@]}" -e ".[webtest]" || echo "test.sh: could not install playwright: the browser test will be skipped"
    .venv-web/bin/python -m pytest Testing/Web -q -rs -p no:cacheprovider || web_status=$?
    echo "test.sh: web tier took $((SECONDS - started)) s"
fi
[ "$status" -ne 0 ] && exit "$status"
exit "$web_status"
