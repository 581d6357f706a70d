#!/usr/bin/env bash
# Runs Drover's whole test suite, installing what the tests need first:
#   - moto's server (PyPI) into ./.venv, for the AWS API tests;
#   - busybox-static (Debian), for the locally built test images;
#   - cfn-lint (PyPI, same venv) and shellcheck (Debian), for tests/tests/infra.rs;
#   - cargo-nextest when missing (falls back to `cargo test`).
# Usage: scripts/test.sh [extra nextest args]
set -euo pipefail
cd "$(dirname "$0")/.."

MOTO_VERSION="5.2.5"
CFN_LINT_VERSION="1.58.0"
step() { printf '\n== %s\n' "$*" >&2; }

step "test dependencies"
if [ ! -x .venv/bin/moto_server ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "moto[server]==${MOTO_VERSION}"
fi
.venv/bin/python -c 'import moto; print("moto", moto.__version__)' >&2
if [ "$(.venv/bin/cfn-lint --version 2>/dev/null)" != "cfn-lint ${CFN_LINT_VERSION}" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check "cfn-lint==${CFN_LINT_VERSION}"
fi
.venv/bin/cfn-lint --version >&2

if [ ! -x /bin/busybox ] || ! file -L /bin/busybox 2>/dev/null | grep -q 'statically linked'; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq busybox-static file >/dev/null
fi
if ! command -v shellcheck >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq shellcheck >/dev/null
fi
echo "busybox: $(/bin/busybox | head -n 1)" >&2

if cargo nextest --version >/dev/null 2>&1; then
  RUNNER=(cargo nextest run --workspace --no-fail-fast)
else
  RUNNER=(cargo test --workspace --no-fail-fast)
fi

step "build (binaries are used by the end-to-end tests)"
cargo build --workspace --bins

step "tests"
export DROVER_MOTO_SERVER="$PWD/.venv/bin/moto_server"
"${RUNNER[@]}" "$@"
