#!/usr/bin/env bash
# Set up this checkout on Debian 12 / Ubuntu: the system packages vfs and its tests use,
# a virtual environment in .venv, and vfs installed into it in editable mode.
# Safe to run again: it installs only what is missing, so a re-run takes seconds.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

apt_packages=(
  python3-venv python3-dev gcc pkg-config  # the venv, and building C extensions (pyfuse3)
  fuse3 libfuse3-dev                       # the mount: fusermount3, and libfuse3 for pyfuse3
  runc bubblewrap busybox-static           # pipeline runtimes, and a static busybox for test images
  restic borgbackup fio                    # what the benchmarks compare against and measure with
  sqlite3 git wget                         # wget: the sandbox probe reaches a host listener with it
)

installed() {
  [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

missing=()
for pkg in "${apt_packages[@]}"; do
  installed "$pkg" || missing+=("$pkg")
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing system packages: ${missing[*]}"
  if [ "$(id -u)" -eq 0 ]; then
    as_root=()
  elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
  else
    echo "setup.sh: missing packages (${missing[*]}) and no sudo to install them: run this as root" >&2
    exit 1
  fi
  apt_get=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -o Dpkg::Use-Pty=0)
  "${apt_get[@]}" update -qq
  "${apt_get[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup.sh: vfs needs Python 3.11 or newer, and python3 is $(python3 -V 2>&1)" >&2
  exit 1
fi

# A .venv whose interpreter is gone (moved checkout, removed Python) is made again.
if [ -d .venv ] && ! .venv/bin/python -c '' 2>/dev/null; then
  echo "==> .venv is broken: making it again"
  rm -rf .venv
fi
if [ ! -d .venv ]; then
  echo "==> creating .venv with $(python3 -V)"
  python3 -m venv .venv
fi

echo "==> installing vfs and its test dependencies into .venv"
.venv/bin/python -m pip install --quiet --prefer-binary --disable-pip-version-check -e '.[test]'
