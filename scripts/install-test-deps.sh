#!/usr/bin/env bash
# Installs what vmlock's tests need on Debian 12 (bookworm): QEMU from bookworm-backports (to match
# the preinstalled qemu-utils 10.x), virtlockd for the side-by-side benchmark, libvirtd with its
# QEMU driver, virsh and the stock lockd plugin (the testkit's private libvirtd), sanlock, etcd,
# protoc with its well-known types (for the etcd-client crate's build), iproute2 (the testkit's
# network namespaces), openssl (certificates for the TLS etcd clusters) and g++ (libFuzzer, for
# scripts/fuzz.sh). Idempotent; needs root. Skips the install when everything is already there.
set -euo pipefail

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu)
command -v virtlockd >/dev/null || need+=(qemu)
command -v libvirtd >/dev/null || need+=(qemu)
command -v virsh >/dev/null || need+=(qemu)
# Only a Recommends of the other libvirt packages: checked on its own.
[ -f /usr/lib/x86_64-linux-gnu/libvirt/lock-driver/lockd.so ] || need+=(qemu)
command -v sanlock >/dev/null || need+=(other)
command -v etcd >/dev/null || need+=(other)
command -v protoc >/dev/null || need+=(other)
# protoc's well-known types (google/protobuf/*.proto), which the etcd-client crate's build imports.
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(other)
command -v etcdctl >/dev/null || need+=(other)
# ip (iproute2): the testkit's network namespaces (netns) configure their veth links with it.
command -v ip >/dev/null || need+=(other)
# openssl: the testkit's TLS etcd clusters make their CA and certificates with it.
command -v openssl >/dev/null || need+=(other)
# c++ (g++): libfuzzer-sys builds libFuzzer for scripts/fuzz.sh.
command -v c++ >/dev/null || need+=(other)
[ ${#need[@]} -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

sources=/etc/apt/sources.list.d/debian.sources
backports=/etc/apt/sources.list.d/bookworm-backports.sources
if [ ! -f "$backports" ]; then
  uri=$(awk '/^URIs:/{print $2; exit}' "$sources" 2>/dev/null || true)
  uri=${uri:-http://deb.debian.org/debian}
  $SUDO tee "$backports" >/dev/null <<EOT
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOT
fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends -t bookworm-backports \
  qemu-system-x86 libvirt-daemon-lock \
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-daemon-plugin-lockd
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
  sanlock etcd-server etcd-client protobuf-compiler libprotobuf-dev iproute2 openssl g++
