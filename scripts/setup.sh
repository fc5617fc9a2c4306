#!/usr/bin/env bash
# Installs what building, the demo and the tests need, idempotently: the wasm32-wasip2
# target, mosquitto (a real broker for the MQTT tests) and a Python venv under target/
# with Microsoft's Azure IoT SDKs (the conformance peers of the hub emulator).
# Usage: scripts/setup.sh [--with-test-deps]
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*"; }

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  log "adding rust target wasm32-wasip2"
  rustup target add wasm32-wasip2
fi

[ "${1:-}" = "--with-test-deps" ] || exit 0

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}
# chromium (+ its WebDriver): the console tests drive it headless. prometheus: the
# observability test scrapes a host with it and runs every query of the Grafana dashboard.
# nats-server: the cluster tests run tether nodes on JetStream.
apt_install mosquitto python3-venv chromium chromium-driver prometheus nats-server

# Debian enables system-wide mosquitto and prometheus services on install; the tests
# start their own on free ports and need no background ones.
for service in mosquitto prometheus nats-server; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$service" 2>/dev/null; then
    systemctl stop "$service" || true
  fi
done

venv=target/pyenv
stamp="$venv/.installed-v2"
if [ ! -f "$stamp" ]; then
  log "creating Python venv $venv with azure-iot-device 2.14.0 and azure-iot-hub 2.7.0"
  mkdir -p target
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check azure-iot-device==2.14.0 azure-iot-hub==2.7.0 six
  touch "$stamp"
fi
