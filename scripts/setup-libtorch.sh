#!/usr/bin/env bash
# Installs libtorch for sobre's optional `tch` backend (burn-tch, LibTorch) from pip: torch
# 2.9.0, the version burn 0.22's torch-sys is built against, into a virtualenv
# (default .venv-libtorch, ~5 GB with the CUDA libraries pip's torch wheel depends on), then
# prints the environment to build and run with:
#
#   scripts/setup-libtorch.sh            # once
#   eval "$(scripts/setup-libtorch.sh --env)"
#   cargo build --release -p sobre-cli --features tch
#   target/release/sobre bench step --config configs/bench-w1.toml --device tch
#
# Never part of the default build or CI: the default backend is burn's pure-Rust `flex`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SOBRE_LIBTORCH_VENV:-.venv-libtorch}"
env_only=false
[ "${1:-}" = "--env" ] && env_only=true
if ! $env_only; then
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install --quiet "torch==2.9.0"
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "no virtualenv at $venv: run scripts/setup-libtorch.sh first" >&2
  exit 1
fi
abs="$(cd "$venv" && pwd)"
lib="$("$abs/bin/python" -W ignore -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
version="$("$abs/bin/python" -W ignore -c 'import torch; print(torch.__version__)')"
if ! $env_only; then
  echo "# torch $version installed in $abs; build and run with:" >&2
fi
# torch-sys asks the virtualenv's python where libtorch is (LIBTORCH_USE_PYTORCH) and links
# against it; the binary then loads the same libraries at run time.
cat <<ENV
export VIRTUAL_ENV="$abs"
export PATH="$abs/bin:\$PATH"
export LIBTORCH_USE_PYTORCH=1
export LD_LIBRARY_PATH="$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
ENV
