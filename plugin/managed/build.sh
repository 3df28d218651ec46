#!/usr/bin/env bash
# Build the cellgate agent image and the Docker managed plugin from Debian packages, with no image
# registry: a Debian rootfs made by mmdebstrap (cached, keyed by a hash of what goes into it), the
# agent's Python dependencies from PyPI into a venv inside it, then cellgate's wheel as the last layer.
#   build.sh rootfs                  print the cached rootfs tarball (built when missing)
#   build.sh image [TAG]             docker build of ./Dockerfile (default TAG cellgate:VERSION)
#   build.sh plugin NAME [TAG] [-- render options]   docker plugin create NAME from the image's rootfs
# Docker is reached through DOCKER_HOST (or its default socket). Run as root.
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE=${CELLGATE_CACHE:-/var/cache/cellgate}
SUITE=bookworm
MIRRORS=(
  "deb http://deb.debian.org/debian $SUITE main"
  "deb http://deb.debian.org/debian $SUITE-updates main"
  "deb http://deb.debian.org/debian-security $SUITE-security main"
)
PACKAGES=(python3 python3-venv python3-bpfcc python3-yaml iproute2 iptables kmod bpftool mount procps)
VERSION=$(/usr/bin/python3 -c 'import configparser; c = configparser.ConfigParser(); c.read("setup.cfg"); print(c["metadata"]["version"])')
PYTHON=${PYTHON:-.venv/bin/python}
export DOCKER_BUILDKIT=0  # the classic builder: no BuildKit or buildx needed, FROM scratch pulls nothing

requirements() {  # the install_requires of setup.cfg, one per line
  /usr/bin/python3 -c 'import configparser; c = configparser.ConfigParser(); c.read("setup.cfg")
print("\n".join(r.strip() for r in c["options"]["install_requires"].splitlines() if r.strip()))'
}

rootfs() {
  local reqs key tar tmp
  reqs=$(requirements)
  key=$(printf '%s\n' "recipe 1" "$SUITE" "${MIRRORS[@]}" "${PACKAGES[@]}" "$reqs" | sha256sum | cut -c1-16)
  tar="$CACHE/rootfs-$key.tar"
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"
  flock 9  # one build at a time (make image and the e2e test may race)
  if [ ! -s "$tar" ]; then
    echo "build.sh: building the Debian rootfs $tar (a few minutes, once)" >&2
    tmp="$CACHE/.rootfs-$key.$$"
    printf '%s\n' "$reqs" >"$tmp.req"
    local started=$SECONDS
    # The wheels come through the host's pip (its index and certificates); the rootfs installs offline.
    rm -rf "$tmp.wheels"
    "$PYTHON" -m pip download -q --disable-pip-version-check --only-binary=:all: -d "$tmp.wheels" -r "$tmp.req" >&2
    mmdebstrap --quiet --mode=root --variant=apt --include="$(IFS=,; echo "${PACKAGES[*]}")" \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
      --customize-hook='chroot "$1" python3 -m venv --system-site-packages /opt/cellgate' \
      --customize-hook="upload $tmp.req /tmp/cg-requirements.txt" \
      --customize-hook="copy-in $tmp.wheels /tmp" \
      --customize-hook="chroot \"\$1\" env -i PATH=/usr/bin:/bin /opt/cellgate/bin/pip install -q --no-cache-dir \
          --disable-pip-version-check --no-index --find-links /tmp/$(basename "$tmp.wheels") -r /tmp/cg-requirements.txt" \
      --customize-hook="rm -rf \"\$1/tmp/cg-requirements.txt\" \"\$1/tmp/$(basename "$tmp.wheels")\" \"\$1\"/var/lib/apt/lists/* \"\$1\"/var/cache/apt/*" \
      --customize-hook='chroot "$1" python3 -c "import bcc"' \
      "$SUITE" "$tmp.tar" "${MIRRORS[@]}" >&2
    mv "$tmp.tar" "$tar"
    rm -rf "$tmp.req" "$tmp.wheels"
    echo "build.sh: rootfs built in $((SECONDS - started))s" >&2
  fi
  exec 9>&-
  echo "$tar"
}

image() {
  local tag=${1:-cellgate:$VERSION} tar ctx=build/cgimage
  tar=$(rootfs)
  rm -rf "$ctx"
  mkdir -p "$ctx"
  ln "$tar" "$ctx/rootfs.tar" 2>/dev/null || cp "$tar" "$ctx/rootfs.tar"
  "$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$ctx" . >&2
  docker build -q --network none -f Dockerfile -t "$tag" "$ctx" >&2
  rm -rf "$ctx"
  echo "$tag"
}

plugin() {  # NAME is the plugin reference ([user/]name[:tag]); its base name is the instance name
  local name=$1 tag=${2:-cellgate:$VERSION} dir=build/cgplugin cid instance
  shift $(( $# >= 2 ? 2 : 1 ))
  [ "${1:-}" = "--" ] && shift
  instance=${name##*/}
  instance=${instance%%:*}
  image "$tag" >/dev/null
  rm -rf "$dir"
  mkdir -p "$dir/rootfs"
  cid=$(docker create "$tag")
  docker export "$cid" | tar -x -C "$dir/rootfs"
  docker rm "$cid" >/dev/null
  "$PYTHON" -m plugin.managed --name "$instance" --driver "$("$PYTHON" -c 'import sys; from plugin.managed import driver_name; print(driver_name(sys.argv[1]))' "$name")" "$@" >"$dir/config.json"
  docker plugin rm -f "$name" >/dev/null 2>&1 || true
  docker plugin create "$name" "$dir" >&2
  rm -rf "$dir"
  echo "$name"
}

cmd=${1:-}
shift || true
case "$cmd" in
  rootfs) rootfs ;;
  image) image "$@" ;;
  plugin) plugin "$@" ;;
  *) echo "usage: $0 rootfs | image [TAG] | plugin NAME [TAG] [-- render options]" >&2; exit 2 ;;
esac
