#!/usr/bin/env bash
# Host set-up for cellgate: Debian packages, the kernel-headers link BCC needs, and .venv.
# Idempotent and quick when everything is already in place. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  python3-bpfcc python3-venv linux-headers-amd64 kmod iproute2 iptables bpftool
  docker.io busybox-static iputils-ping netcat-openbsd
  podman containernetworking-plugins
  mmdebstrap etcd-server etcd-client
  curl wrk nginx-light prometheus chromium
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# BCC compiles against the running kernel's headers. Debian ships the headers of its own
# kernel; when the running kernel has no build directory, point it at them (this works
# for the networking programs cellgate builds).
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$hdr" ] || [ -z "$common" ]; then
    echo "setup: no kernel headers found under /usr/src" >&2
    exit 1
  fi
  mkdir -p "$kdir"
  ln -sfn "$hdr" "$kdir/build"
  ln -sfn "$common" "$kdir/source"
  echo "setup: linked $kdir/build -> $hdr"
fi

# cnitool, the libcni reference client, for the CNI tests (Debian ships libcni, not the tool)
bash .ci/build-cnitool.sh

# The venv sees Debian's BCC binding through --system-site-packages.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
if [ ! -f .venv/.installed ] || [ setup.cfg -nt .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test,l7-test]'
  touch .venv/.installed
fi
# .venv/bin/cellgate-cni: the CNI plugin launcher (system python -IS: fast, no site)
.venv/bin/cellgate install-cni --dir .venv/bin >/dev/null
.venv/bin/python -c 'import bcc, pyroute2, flask' 2>/dev/null || {
  echo "setup: the venv cannot import bcc/pyroute2/flask" >&2
  exit 1
}
