#!/usr/bin/env bash
# Build cnitool (the libcni reference client) from Debian's golang-github-appc-cni source
# package with Debian's Go, into build/cnitool. Debian packages libcni but not cnitool.
# Idempotent; the deb-src entry it needs is added only for the download and removed after.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x build/cnitool ] && exit 0
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends golang-go golang-github-appc-cni-dev dpkg-dev >/dev/null
src=/etc/apt/sources.list.d/cellgate-build-debsrc.sources
cleanup() { rm -f "$src"; }
trap cleanup EXIT
cat > "$src" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
apt-get update -qq
mkdir -p build/src
(cd build/src && apt-get source -qq golang-github-appc-cni >/dev/null 2>&1)
tool=$(ls -d build/src/golang-github-appc-cni-*/cnitool | head -n 1)
(cd "$tool" && GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE="$PWD/../../gocache" go build -o ../../../cnitool .)
rm -rf build/src build/gocache
cleanup
apt-get update -qq
echo "setup: built build/cnitool"
