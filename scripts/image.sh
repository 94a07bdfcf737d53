#!/usr/bin/env bash
# Builds the runtime stage of deploy/Containerfile from the release build already made
# (ARTEFACTS=prebuilt) on a Debian base made locally with mmdebstrap (no image registry is
# reachable here), then checks the image: its user is not root, and `prefstream --version` and
# `prefstream infer` on the shipped example run inside the image's file system with the image's
# environment. `podman run` is refused on this host (setrlimit), so the check chroots into
# `podman image mount`. Idempotent; the base image is made once (~30 s).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${PREFSTREAM_CACHE:-$HOME/.cache/prefstream}"
BIN="${CARGO_TARGET_DIR:-$CACHE/target}/release/prefstream"
BASE=localhost/debian:bookworm-slim
IMAGE="${IMAGE:-localhost/prefstream:test}"
[ -x "$BIN" ] || { echo "image: $BIN missing: run cargo build --release first" >&2; exit 1; }
for tool in podman mmdebstrap; do
  command -v "$tool" >/dev/null || { echo "image: $tool missing: run scripts/setup.sh" >&2; exit 1; }
done

if ! podman image exists "$BASE"; then
  tar="$CACHE/images/debian-bookworm-minbase.tar"
  if [ ! -f "$tar" ]; then
    mkdir -p "$(dirname "$tar")"
    echo "image: making the Debian base with mmdebstrap"
    mmdebstrap --quiet --variant=minbase --include=libssl3,ca-certificates bookworm "$tar.part.tar"
    mv "$tar.part.tar" "$tar"
  fi
  podman import --quiet "$tar" "$BASE" >/dev/null
fi

ctx=$(mktemp -d)
root=""
cleanup() {
  [ -z "$root" ] || podman image unmount "$IMAGE" >/dev/null 2>&1 || true
  rm -rf "$ctx"
}
trap cleanup EXIT
mkdir -p "$ctx/dist/bin" "$ctx/dist/lib"
cp "$BIN" "$ctx/dist/bin/"
cp -P "$CACHE"/ort/libonnxruntime*.so* "$ctx/dist/lib/"
cp -r onnx examples "$ctx/dist/"
cp deploy/Containerfile "$ctx/"
podman build --quiet --isolation chroot -f "$ctx/Containerfile" --target runtime \
  --build-arg BASE_IMAGE="$BASE" --build-arg ARTEFACTS=prebuilt -t "$IMAGE" "$ctx" >/dev/null

user=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
[ "$user" = "10001:10001" ] || { echo "image: runs as '$user', want 10001:10001" >&2; exit 1; }
mapfile -t envs < <(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
root=$(podman image mount "$IMAGE")
inside() { env -i "${envs[@]}" chroot --userspec=10001:10001 "$root" /usr/local/bin/prefstream "$@"; }
version=$(inside --version)
want="prefstream $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
[ "$version" = "$want" ] || { echo "image: --version says '$version', want '$want'" >&2; exit 1; }
out=$(cd "$root/opt/prefstream" && inside infer --events /opt/prefstream/examples/events.jsonl --greedy --json)
python3 - "$out" <<'PY'
import json, sys
v = json.loads(sys.argv[1])
assert v["format_ok"] and v["description"], v
print(f"image: infer in the image wrote {v['description']!r} ({v['tokens']} tokens, {v['device']})")
PY
echo "image: $IMAGE ok ($(podman image inspect --format '{{.Size}}' "$IMAGE") bytes; $version)"
