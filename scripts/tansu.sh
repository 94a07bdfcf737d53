#!/usr/bin/env bash
# tansu, a Kafka-protocol broker in one process, for the end-to-end tests and for trying
# `prefstream run` locally:
#   scripts/tansu.sh [install]  installs tansu 0.6.0 (with the dynostore storage engine) under
#                               $PREFSTREAM_TOOLS (default ~/.cache/prefstream/tools) unless it is
#                               there already, and prints the binary's path. The first install
#                               compiles tansu from crates.io: about 15-20 minutes.
#   scripts/tansu.sh path       prints the binary's path if installed (exit 1 if not).
#   scripts/tansu.sh start      starts a broker (memory storage) on a free port in the background
#                               and prints its address (127.0.0.1:PORT), for --brokers; running it
#                               again while it is up just prints the address.
#   scripts/tansu.sh addr       prints the address of the running broker (exit 1 if none).
#   scripts/tansu.sh stop       stops it.
# Broker state (pid, address, log) lives in $PREFSTREAM_TANSU_DIR. Memory storage: everything
# is gone when the broker stops. Create topics with
#   "$(scripts/tansu.sh path)" topic create --broker tcp://ADDR --partitions N NAME
# or `prefstream check --brokers ADDR --create-topics N`.
set -euo pipefail
TANSU_VERSION="0.6.0"
root="${PREFSTREAM_TOOLS:-$HOME/.cache/prefstream/tools}"
bin="$root/bin/tansu"
dir="${PREFSTREAM_TANSU_DIR:-${TMPDIR:-/tmp}/prefstream-tansu}"
pidfile="$dir/tansu.pid"
addrfile="$dir/addr"
logfile="$dir/tansu.log"

installed() { [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -qx "tansu $TANSU_VERSION"; }

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

install() {
  if installed; then
    echo "$bin"
    return 0
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "tansu.sh: cargo not found; install Rust (https://rustup.rs) first" >&2
    exit 1
  fi
  echo "tansu.sh: installing tansu $TANSU_VERSION into $root (compiles from crates.io: ~15-20 min on a fresh machine)" >&2
  mkdir -p "$root"
  force=()
  if [ -e "$bin" ]; then force=(--force); fi # another version is there: replace it
  cargo install tansu --version "$TANSU_VERSION" --features dynostore --locked "${force[@]}" \
    --root "$root" --target-dir "$HOME/.cache/prefstream/tansu-target" >&2
  if ! installed; then
    echo "tansu.sh: cargo install finished but $bin is not tansu $TANSU_VERSION" >&2
    exit 1
  fi
  echo "$bin"
}

start() {
  install >/dev/null
  mkdir -p "$dir"
  if running && [ -f "$addrfile" ]; then
    cat "$addrfile"
    exit 0
  fi
  rm -f "$pidfile" "$addrfile"
  for _ in $(seq 1 20); do
    port=$((20000 + RANDOM % 40000))
    if port_busy "$port"; then continue; fi
    url="tcp://127.0.0.1:$port"
    # Its own session, stdio on the log: the broker outlives this script and never holds the
    # caller's pipes open (so `addr=$(scripts/tansu.sh start)` returns).
    RUST_LOG="${RUST_LOG:-warn}" setsid "$bin" broker --listener-url "$url" --advertised-listener-url "$url" \
      --storage-engine memory://tansu/ </dev/null >>"$logfile" 2>&1 &
    echo $! >"$pidfile"
    for _ in $(seq 1 200); do
      if ! running; then break; fi
      if port_busy "$port"; then
        echo "127.0.0.1:$port" | tee "$addrfile"
        exit 0
      fi
      sleep 0.05
    done
    # Lost a race for the port, or failed to start: clean up and try another.
    if running; then kill "$(cat "$pidfile")" 2>/dev/null || true; fi
    rm -f "$pidfile"
  done
  echo "tansu.sh: could not start tansu; see $logfile" >&2
  exit 1
}

stop() {
  if running; then
    pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do running || break; sleep 0.05; done
    if running; then kill -9 "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$pidfile" "$addrfile"
}

case "${1:-install}" in
install) install ;;
path)
  if installed; then echo "$bin"; else echo "tansu $TANSU_VERSION not installed; run $0 install" >&2; exit 1; fi
  ;;
start) start ;;
stop) stop ;;
addr)
  if running && [ -f "$addrfile" ]; then cat "$addrfile"; else echo "not running" >&2; exit 1; fi
  ;;
*)
  echo "usage: $0 [install|path|start|addr|stop]" >&2
  exit 2
  ;;
esac
