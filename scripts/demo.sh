#!/usr/bin/env bash
# The demo from a fresh machine: installs what it needs, builds the host and an example
# agent, and runs it. Ctrl-C ends it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p tether-host
cargo build --profile guest --target wasm32-wasip2 -p http-echo
listen=${TETHER_LISTEN:-127.0.0.1:8080}
cat <<MSG

The http-echo agent answers on http://$listen/http_echo/ — from another terminal:
  curl 'http://$listen/http_echo/hello?x=1'
  curl 'http://$listen/http_echo/later?secs=2'        (answered after a timer)
  curl 'http://$listen/http_echo/fetch?url=http://$listen/http_echo/inner'
Ctrl-C stops it.

MSG
exec target/release/tether run target/wasm32-wasip2/guest/http_echo.wasm --listen "$listen"
