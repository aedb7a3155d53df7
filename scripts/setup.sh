#!/usr/bin/env bash
# Installs what cryptoplane needs on a fresh Debian machine, then the package itself:
#   - Debian packages (only the missing ones): a C compiler and OpenSSL's headers for the
#     native sector kernel, the openssl program that `cryptoplane speed` compares against;
#   - a virtual environment in .venv with the package (editable) and, with --test, the
#     test tools.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

apt_packages=(gcc libssl-dev openssl pkg-config)
# the real programs that volumes (LUKS, NBD) and streams (age) are tested against
# (python3-libnbd: nbdsh, libnbd's client for the system python3, the NBD tests' oracle)
apt_packages+=(cryptsetup-bin qemu-utils nbdkit fio libnbd-bin python3-libnbd age)
# the fabric tests start their own PostgreSQL cluster (initdb/pg_ctl as an unprivileged user)
apt_packages+=(postgresql)
python_bin=${PYTHON:-python3}
# Debian's python3 needs its -dev and -venv packages to build extensions and venvs
if [ "$(command -v "$python_bin")" = /usr/bin/python3 ]; then
  apt_packages+=(python3-dev python3-venv)
fi

missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$python_bin" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
echo "setup: installing cryptoplane${extras} into .venv (builds the native kernel)" >&2
.venv/bin/python -m pip install -q -e ".${extras}"
.venv/bin/python -c 'import cryptoplane._native as n; print(f"setup: sector kernel: {n.BACKEND}", n.BACKEND_REASON)' >&2

# PyKMIP (0.11, its own server and ProxyKmipClient): the peer `cryptoplane remote-speed`
# measures against (cryptoplane/yardstick/kmip_peer.py runs it in subprocesses). Not a
# dependency of the package. It goes into .venv with cryptography held at the version
# already there (48.x: PyKMIP 0.11 works with it); if pip cannot keep that version, it goes
# into its own .venv-kmip instead, which kmip_peer.py uses when it exists.
if ! .venv/bin/python -c 'import kmip.pie.client' 2>/dev/null && [ ! -x .venv-kmip/bin/python ]; then
  held=$(.venv/bin/python -c 'import cryptography; print(cryptography.__version__)')
  echo "setup: installing pykmip (cryptography held at $held)" >&2
  if ! .venv/bin/python -m pip install -q pykmip "cryptography==$held"; then
    echo "setup: pykmip needs another cryptography: installing it into .venv-kmip" >&2
    "$python_bin" -m venv .venv-kmip
    .venv-kmip/bin/python -m pip install -q pykmip
  fi
fi
