#!/usr/bin/env bash
# Sets up an offline build of sobre's optional `cuda` feature (burn's CubeCL CUDA backend):
#
#   scripts/setup-cuda-build.sh          # once (idempotent; --force reinstalls)
#   cargo build --release -p sobre-cli --features cuda
#   target/release/sobre ... --device cuda
#
# Why: `cuda` pulls cubecl-cuda -> cubecl-llvm (feature `nvptx`), whose build script links a
# static LLVM 23.1 found by the build-dependency `tracel-llvm-bundler` (23.1.0-4 in
# Cargo.lock). The bundler's own build script downloads that LLVM from GitHub releases,
# which fails without internet access. It skips the download when its install prefix
#   ${XDG_DATA_HOME:-~/.local/share}/tracel/tracel-llvm-<bundler version>
# already holds the marker file `.tracel-llvm-installed`; afterwards only
# `<prefix>/bin/llvm-config --link-static --libs/--system-libs/--libdir/--includedir/--cxxflags`
# is asked how to link. The same LLVM (23.1.1, a patch release of the bundler's 23.1.0) is
# published on PyPI as static-library wheels: `mlc-llvm-static` (X86, headers, the core
# libraries, bundled libz.a/libzstd.a and a Python `llvm-config`) and
# `mlc-llvm-static-extra-targets` (all other targets, NVPTX among them). This script fetches
# both from PyPI, unpacks them into that prefix, and writes the marker. No GPU and no CUDA
# toolkit is needed to build: cudarc loads libcuda/libnvrtc at run time.
#
# Needs: python3 with pip (download, and at build time the `llvm-config` script itself), a
# C/C++ compiler (the bundler and cubecl-llvm compile small C/C++ wrappers against the LLVM
# headers). Missing ones are installed with apt-get (Debian/Ubuntu).
#
# Never part of the default build or CI.
set -euo pipefail
cd "$(dirname "$0")/.."

force=false
[ "${1:-}" = "--force" ] && force=true

# --- What to install -----------------------------------------------------------------------
# The LLVM SDK on PyPI; 23.1.1.post0 is its only 23.1 release. The hashes pin the exact files
# (pip checks them on download, and this script checks them on re-use of the cache).
sdk_version="23.1.1.post0"
llvm_major_minor="23.1"
declare -A wheel_sha256=(
  [mlc_llvm_static-23.1.1.post0-py3-none-manylinux_2_28_x86_64.whl]=dcfec888abfaa418be77d41af585805f31463584cf9c90582992c00f392c1ac5
  [mlc_llvm_static_extra_targets-23.1.1.post0-py3-none-manylinux_2_28_x86_64.whl]=c36e834d9a4e9cf9759f27fece65711ece7a2fc2b5a96dbb15d66f5e9e787929
)

if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  echo "setup-cuda-build.sh: only Linux x86_64 is supported (the pinned wheels are manylinux_2_28_x86_64)" >&2
  exit 1
fi

# The bundler version decides the directory name (tracel-llvm-bundler src/config.rs:
# llvm_path() = data_local_dir()/tracel/tracel-llvm-<TRACEL_LLVM_FULL_VERSION>). Read it from
# Cargo.lock so a bump of burn/cubecl is noticed instead of silently missed.
bundler_version="$(awk '/^name = "tracel-llvm-bundler"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)"
if [ -z "$bundler_version" ]; then
  echo "setup-cuda-build.sh: tracel-llvm-bundler is not in Cargo.lock; nothing to do" >&2
  exit 1
fi
case "$bundler_version" in
  "$llvm_major_minor".*) ;;
  *)
    echo "setup-cuda-build.sh: Cargo.lock has tracel-llvm-bundler $bundler_version, but the pinned" >&2
    echo "  wheels are LLVM $sdk_version; update sdk_version and the hashes in this script" >&2
    exit 1 ;;
esac

# dirs::data_local_dir() on Linux: $XDG_DATA_HOME if it is an absolute path, else
# $HOME/.local/share. Must match what the build sees, so run this as the user who builds.
if [[ "${XDG_DATA_HOME:-}" == /* ]]; then data_dir="$XDG_DATA_HOME"; else data_dir="$HOME/.local/share"; fi
prefix="$data_dir/tracel/tracel-llvm-$bundler_version"
marker="$prefix/.tracel-llvm-installed"
cache="${SOBRE_LLVM_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sobre/llvm-wheels}"

# --- System packages -----------------------------------------------------------------------
# Only what is missing, with one `apt-get update`. Not needed: zlib/zstd dev packages (the
# SDK ships libz.a and libzstd.a in its lib/, which is first on the link path), libxml2 (not
# linked by this LLVM build), any CUDA package (the driver is loaded at run time).
apt_packages=()
command -v python3 >/dev/null || apt_packages+=(python3)
python3 -m pip --version >/dev/null 2>&1 || apt_packages+=(python3-pip)
{ command -v c++ >/dev/null && command -v cc >/dev/null; } || apt_packages+=(g++)
if [ ${#apt_packages[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "# installing with apt-get: ${apt_packages[*]}" >&2
  $sudo apt-get update
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${apt_packages[@]}"
fi

# --- Already installed? --------------------------------------------------------------------
# Our install records the SDK version in share/mlc-llvm-static/base.json. A marker without it
# is the bundler's own download (from a machine with network): leave that alone.
installed_version() {
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sdk_version"])' \
    "$prefix/share/mlc-llvm-static/base.json" 2>/dev/null || true
}
if ! $force && [ -e "$marker" ]; then
  have="$(installed_version)"
  if [ -z "$have" ]; then
    echo "# $prefix already holds a tracel LLVM bundle (not from PyPI); nothing to do" >&2
    exit 0
  fi
  if [ "$have" = "$sdk_version" ] && [ -f "$prefix/share/mlc-llvm-static/extra.json" ]; then
    echo "# LLVM $have (mlc-llvm-static + extra targets) already installed in $prefix" >&2
    echo "# build with: cargo build --release -p sobre-cli --features cuda" >&2
    exit 0
  fi
fi

# --- Download the wheels (once) ------------------------------------------------------------
mkdir -p "$cache"
sha_ok() { [ -f "$cache/$1" ] && [ "$(sha256sum "$cache/$1" | cut -d' ' -f1)" = "${wheel_sha256[$1]}" ]; }
need_download=false
for w in "${!wheel_sha256[@]}"; do sha_ok "$w" || need_download=true; done
if $need_download; then
  # --require-hashes makes pip refuse anything but the pinned files; --no-deps because the
  # wheels have none that matter here; --only-binary because only the wheels hold the
  # libraries. --platform/--python-version select the wheels whatever this python is (they
  # declare Requires-Python >=3.10; pip only downloads, nothing is installed into python).
  req="$(mktemp)"
  trap 'rm -f "$req"' EXIT
  for w in "${!wheel_sha256[@]}"; do
    name="${w%%-*}"                       # mlc_llvm_static / mlc_llvm_static_extra_targets
    echo "${name//_/-}==$sdk_version --hash=sha256:${wheel_sha256[$w]}" >>"$req"
  done
  echo "# downloading the LLVM wheels from PyPI into $cache (~92 MB)" >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
    --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation py \
    --dest "$cache" -r "$req"
  for w in "${!wheel_sha256[@]}"; do
    sha_ok "$w" || { echo "setup-cuda-build.sh: $cache/$w missing or wrong sha256 after download" >&2; exit 1; }
  done
else
  echo "# using the cached wheels in $cache" >&2
fi

# --- Unpack into the bundler's prefix ------------------------------------------------------
# Both wheels hold an `mlc_llvm_static/static/` tree (bin/ include/ lib/ share/) with no file
# in common; merged, it is exactly the LLVM install prefix the bundler expects. Unpack into a
# staging directory next to the prefix and swap it in, so a failure never leaves a half
# install behind a marker.
mkdir -p "$(dirname "$prefix")"
stage="$(mktemp -d "$prefix.staging.XXXXXX")"
trap 'rm -rf "$stage"; rm -f "${req:-}"' EXIT
for w in "${!wheel_sha256[@]}"; do
  python3 - "$cache/$w" "$stage" <<'PY'
import sys, zipfile, shutil, os
wheel, dest = sys.argv[1], sys.argv[2]
root = "mlc_llvm_static/static/"
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if not info.filename.startswith(root) or info.is_dir():
            continue
        target = os.path.join(dest, info.filename[len(root):])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with z.open(info) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
        mode = (info.external_attr >> 16) & 0o777   # zipfile drops the exec bit; restore it
        if mode:
            os.chmod(target, mode)
PY
done
chmod +x "$stage/bin/llvm-config"

# The bundler runs `<prefix>/bin/llvm-config --link-static ...` (a Python script here; it
# finds the SDK relative to its own path). Check it answers and that NVPTX is linked in
# (the `all` profile, active when the extra-targets wheel is present).
"$stage/bin/llvm-config" --link-static --version >/dev/null
targets="$("$stage/bin/llvm-config" --targets-built)"
case " $targets " in
  *" NVPTX "*) ;;
  *) echo "setup-cuda-build.sh: the unpacked LLVM lacks the NVPTX target ($targets)" >&2; exit 1 ;;
esac

chmod 755 "$stage"                    # mktemp -d made it 0700
rm -rf "$prefix"
mv "$stage" "$prefix"
# The marker the bundler checks before downloading (tracel-llvm-bundler build.rs: `if
# sentinel.exists() { return Ok(()) }`).
: >"$marker"

cat >&2 <<EOF
# installed LLVM $("$prefix/bin/llvm-config" --version) (PyPI mlc-llvm-static + mlc-llvm-static-extra-targets $sdk_version)
#   into   $prefix ($(du -sh "$prefix" | cut -f1))
#   marker $marker
#   wheels $cache
#   targets: $targets
# build with:
#   cargo build --release -p sobre-cli --features cuda
EOF
