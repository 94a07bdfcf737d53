#!/usr/bin/env bash
# A throwaway redis-server for tests and the demo: `scripts/redis.sh [start]` starts one on a
# free port (installing redis-server with apt-get if missing) and prints its URL; running it
# again while it is up just prints the URL. `scripts/redis.sh stop` stops it; `url` prints it.
# No persistence (--save "" --appendonly no). State lives in $PREFSTREAM_REDIS_DIR.
set -euo pipefail
dir="${PREFSTREAM_REDIS_DIR:-${TMPDIR:-/tmp}/prefstream-redis}"
pidfile="$dir/redis.pid"
urlfile="$dir/url"

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

case "${1:-start}" in
start)
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "redis-server not found; installing it with apt-get" >&2
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq redis-server >&2
  fi
  mkdir -p "$dir"
  if running && [ -f "$urlfile" ]; then
    cat "$urlfile"
    exit 0
  fi
  rm -f "$pidfile" "$urlfile"
  for _ in $(seq 1 20); do
    port=$((20000 + RANDOM % 40000))
    if port_busy "$port"; then continue; fi
    if redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
      --daemonize yes --pidfile "$pidfile" --dir "$dir" --logfile "$dir/redis.log"; then
      for _ in $(seq 1 100); do
        if [ "$(redis-cli -p "$port" ping 2>/dev/null || true)" = "PONG" ]; then
          echo "redis://127.0.0.1:$port/" | tee "$urlfile"
          exit 0
        fi
        sleep 0.05
      done
      # Lost a race for the port (or failed to start): clean up and try another.
      if running; then kill "$(cat "$pidfile")" || true; fi
      rm -f "$pidfile"
    fi
  done
  echo "could not start redis-server; see $dir/redis.log" >&2
  exit 1
  ;;
stop)
  if running; then
    kill "$(cat "$pidfile")"
    for _ in $(seq 1 100); do running || break; sleep 0.05; done
  fi
  rm -f "$pidfile" "$urlfile"
  ;;
url)
  if running && [ -f "$urlfile" ]; then cat "$urlfile"; else echo "not running" >&2; exit 1; fi
  ;;
*)
  echo "usage: $0 [start|stop|url]" >&2
  exit 2
  ;;
esac
