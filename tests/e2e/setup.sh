#!/usr/bin/env bash
# Prepare the machine for the mediamesh end-to-end tests (idempotent, non-interactive).
#  - Debian packages chromium + chromium-driver, prometheus (prometheus + promtool; installed
#    only when missing; a system prometheus service the package starts is stopped and disabled:
#    the tests run their own on free loopback ports), coturn (turnutils_uclient, turnutils_peer
#    and turnserver for the TURN tests and benchmark; installed only when missing)
#  - a venv at <repo>/.venv with tests/e2e/requirements.txt (pip runs only when the
#    requirements changed since the last successful install; see the stamp file)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="$REPO/.venv"
REQ="$HERE/requirements.txt"
STAMP="$VENV/.e2e-requirements.sha256"
export DEBIAN_FRONTEND=noninteractive

log() { echo "[e2e setup] $*"; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
fi

# --- Debian packages -------------------------------------------------------------------------
missing=()
for pkg in chromium chromium-driver python3-venv prometheus coturn; do
    if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        log "package $pkg: present"
    else
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]} (apt-get update first)"
    $SUDO apt-get update -q </dev/null
    # No service may start during the install (coturn's init script would start a turnserver
    # on 3478 where no systemd is running): a policy-rc.d that denies, unless one exists.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod 755 "$policy"
    fi
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
    if [ -n "$policy" ]; then $SUDO rm -f "$policy"; fi
else
    log "Debian packages: nothing to install"
fi
# The prometheus package enables prometheus.service and starts it on :9090 where services can
# start (systemd or sysv init; not in containers whose policy-rc.d forbids it). Tests start their
# own server; stop the system one that this script just installed so that nothing stays bound.
if [[ " ${missing[*]} " == *" prometheus "* ]]; then
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        if systemctl is-active --quiet prometheus.service 2>/dev/null; then
            log "stopping and disabling the system prometheus.service the package started"
            $SUDO systemctl disable --now prometheus.service </dev/null || log "WARNING: could not stop prometheus.service"
        else
            $SUDO systemctl disable prometheus.service </dev/null >/dev/null 2>&1 || true
        fi
    elif [ -x /etc/init.d/prometheus ] && /etc/init.d/prometheus status >/dev/null 2>&1; then
        log "stopping the system prometheus the package started (init.d)"
        $SUDO /etc/init.d/prometheus stop </dev/null || log "WARNING: could not stop /etc/init.d/prometheus"
    fi
fi
for bin in /usr/bin/chromium /usr/bin/chromedriver /usr/bin/prometheus /usr/bin/promtool /usr/bin/turnutils_uclient /usr/bin/turnutils_peer /usr/bin/turnserver; do
    [ -x "$bin" ] || { log "ERROR: $bin missing after install"; exit 1; }
done
# The coturn package ships a disabled service (TURNSERVER_ENABLED unset); nothing may listen on
# 3478 behind the tests' back.
if pgrep -x turnserver >/dev/null 2>&1; then
    log "WARNING: a turnserver is running (pid $(pgrep -x turnserver | tr '\n' ' ')); the tests use their own ports"
fi

# --- Python venv -------------------------------------------------------------------------------
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV"
    "$PY" -m venv "$VENV"
else
    log "venv $VENV: present"
fi
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [ "$want" = "$have" ] && "$VENV/bin/python" -c "import aiortc, selenium, pytest, pytest_timeout, requests, grpc, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc, schemathesis, hypothesis" 2>/dev/null; then
    log "python requirements: up to date (stamp $want)"
else
    log "installing python requirements from $REQ"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-input -r "$REQ" </dev/null
    echo "$want" > "$STAMP"
    log "python requirements installed (stamp $want)"
fi
log "ready: $("$VENV/bin/python" --version), $(/usr/bin/chromium --version 2>/dev/null | head -1), $(/usr/bin/chromedriver --version 2>/dev/null | head -1), $(/usr/bin/prometheus --version 2>&1 | head -1)"
