#!/usr/bin/env bash
# Installs what prefstream's tests and demo need, idempotently:
#   - ONNX Runtime's shared library from the official PyPI wheel (CPU build) into
#     $PREFSTREAM_CACHE/ort (default ~/.cache/prefstream/ort), where prefstream looks for it;
#   - redis-server (Debian package) for the state-store tests;
#   - nothing is ever downloaded at build time.
# Set ORT_DYLIB_PATH to use another libonnxruntime.so instead.
set -euo pipefail
CACHE="${PREFSTREAM_CACHE:-$HOME/.cache/prefstream}"
ORT_VERSION="${ORT_VERSION:-1.32.0}"
ORT_DIR="$CACHE/ort"
mkdir -p "$CACHE"

if [ ! -f "$ORT_DIR/libonnxruntime.so.$ORT_VERSION" ]; then
  echo "setup: fetching onnxruntime $ORT_VERSION (CPU) from PyPI"
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$tmp" "onnxruntime==$ORT_VERSION"
  python3 - "$tmp" "$ORT_DIR" "$ORT_VERSION" <<'PY'
import glob, os, sys, zipfile
tmp, out, ver = sys.argv[1:]
os.makedirs(out, exist_ok=True)
whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.startswith("onnxruntime/capi/libonnxruntime") and ".so" in n:
            dst = os.path.join(out, os.path.basename(n))
            with z.open(n) as src, open(dst + ".part", "wb") as f:
                f.write(src.read())
            os.replace(dst + ".part", dst)
PY
  rm -rf "$tmp"
fi
ln -sf "libonnxruntime.so.$ORT_VERSION" "$ORT_DIR/libonnxruntime.so"
echo "setup: ONNX Runtime at $ORT_DIR/libonnxruntime.so"

if ! command -v redis-server >/dev/null 2>&1; then
  echo "setup: installing redis-server (Debian package)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi
echo "setup: $(redis-server --version | cut -d' ' -f1-3)"

# OpenSSL headers: librdkafka is built with TLS (SSL, SASL_SSL, SCRAM).
if ! pkg-config --exists openssl 2>/dev/null; then
  echo "setup: installing libssl-dev and pkg-config (Debian packages) for Kafka TLS"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libssl-dev pkg-config >/dev/null
fi
