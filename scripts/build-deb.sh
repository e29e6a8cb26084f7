#!/usr/bin/env bash
# Builds the Debian package of vmlock (dpkg-deb, no other tool): the `vmlock` program (which is
# also the daemon: `vmlock daemon`), libvirt's lock-driver plugin, the systemd units, default
# configuration files (conffiles), man pages and shell completions generated from the CLI.
#
#   scripts/build-deb.sh [--version V] [--vmlock PATH] [--plugin PATH] [--out DIR] [--fast]
#
# Default: binaries from a release build (`cargo build --release -p vmlock-cli -p vmlock-libvirt`,
# run here if they are missing), the package in target/debian/. --fast compresses lightly (tests).
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
vmlock=target/release/vmlock
plugin=target/release/libvmlock_libvirt.so
out=target/debian
compress=(-Zxz)
while [ $# -gt 0 ]; do
  case "$1" in
    --version) version=$2; shift 2 ;;
    --vmlock) vmlock=$2; shift 2 ;;
    --plugin) plugin=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --fast) compress=(-Zgzip -z1); shift ;;
    *) echo "build-deb.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ ! -x "$vmlock" ] || [ ! -f "$plugin" ]; then
  cargo build --release --locked -p vmlock-cli -p vmlock-libvirt
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
install -D -m 0755 "$vmlock" "$root/usr/bin/vmlock"
install -D -m 0644 "$plugin" "$root/usr/lib/x86_64-linux-gnu/libvirt/lock-driver/vmlock.so"

# systemd: the socket as shipped; the service runs the packaged program as the daemon.
install -D -m 0644 dist/systemd/vmlockd.socket "$root/lib/systemd/system/vmlockd.socket"
sed -e 's|^ExecStart=.*|ExecStart=/usr/bin/vmlock --runtime-dir /run/vmlock daemon --config /etc/vmlock/vmlockd.toml|' \
  dist/systemd/vmlockd.service >"$stage/vmlockd.service"
install -D -m 0644 "$stage/vmlockd.service" "$root/lib/systemd/system/vmlockd.service"

# Configuration files (conffiles): every key commented out, so the defaults apply.
install -d "$root/etc/vmlock" "$root/etc/libvirt"
cat >"$root/etc/vmlock/vmlockd.toml" <<'EOT'
# vmlockd's configuration; see vmlockd.toml(5). Every key is optional.
#auto_disk_leases = true
#file_lockspace_dir = "/var/lib/vmlock/lockspace"
#max_clients = 4096
#lease_check_interval_ms = 1000
#lock_failure_grace_ms = 10000
EOT
cat >"$root/etc/libvirt/qemu-vmlock.conf" <<'EOT'
# libvirt's vmlock lock driver (qemu.conf: lock_manager = "vmlock"); see qemu-vmlock.conf(5).
#auto_disk_leases = 1
#require_lease_for_disks = 0
#runtime_dir = "/run/vmlock"
#vmlock_binary = "/usr/bin/vmlock"
EOT

# Man pages and completions, generated from the CLI definition.
"$vmlock" generate-docs --out "$stage/gen"
install -d "$root/usr/share/man/man1" "$root/usr/share/man/man5"
for page in "$stage"/gen/man1/*.1; do
  gzip -9n <"$page" >"$root/usr/share/man/man1/$(basename "$page").gz"
done
for page in dist/man/*.5; do
  gzip -9n <"$page" >"$root/usr/share/man/man5/$(basename "$page").gz"
done
install -D -m 0644 "$stage/gen/completions/vmlock.bash" "$root/usr/share/bash-completion/completions/vmlock"
install -D -m 0644 "$stage/gen/completions/_vmlock" "$root/usr/share/zsh/vendor-completions/_vmlock"
install -D -m 0644 "$stage/gen/completions/vmlock.fish" "$root/usr/share/fish/vendor_completions.d/vmlock.fish"

doc=$root/usr/share/doc/vmlock
install -d "$doc"
cp README.md ARCHITECTURE.md docs/*.md "$doc/"
cat >"$doc/README.Debian" <<'EOT'
vmlock for Debian
=================

- vmlockd runs as `vmlock daemon`, socket-activated: systemctl enable --now vmlockd.socket
  (done on first install when systemd runs). Stopping, restarting or upgrading it never touches a
  guest: each VM's supervisor keeps its locks and the next daemon takes them back.
- libvirt: the plugin is installed as vmlock.so in libvirt's lock-driver directory; add
  lock_manager = "vmlock" to /etc/libvirt/qemu.conf and restart libvirtd (see libvirt.md here).
- Configuration: /etc/vmlock/vmlockd.toml (vmlockd.toml(5)), /etc/libvirt/qemu-vmlock.conf
  (qemu-vmlock.conf(5)).
EOT
cat >"$doc/copyright" <<'EOT'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: vmlock
License: Apache-2.0 OR MIT
EOT

install -d "$root/DEBIAN"
size=$(du -sk "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<EOT
Package: vmlock
Version: $version
Architecture: amd64
Maintainer: vmlock developers <vmlock@example.invalid>
Installed-Size: $size
Depends: libc6 (>= 2.36)
Suggests: qemu-system-x86, libvirt-daemon
Section: admin
Priority: optional
Description: lock manager for virtual-machine disks
 Keeps every VM disk image written by one VM at a time, through start, shutdown, lock daemon
 restarts with guests running, hotplug and live migration. Includes vmlockd (as
 "vmlock daemon"), "vmlock run" and libvirt's vmlock lock-driver plugin.
EOT
cat >"$root/DEBIAN/conffiles" <<'EOT'
/etc/vmlock/vmlockd.toml
/etc/libvirt/qemu-vmlock.conf
EOT
cat >"$root/DEBIAN/postinst" <<'EOT'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
  if [ -z "$2" ]; then
    systemctl enable --now vmlockd.socket || true
  else
    # Upgrade: the new daemon takes every lock back from the VMs' supervisors; no guest is touched.
    systemctl try-restart vmlockd.service || true
  fi
fi
exit 0
EOT
cat >"$root/DEBIAN/prerm" <<'EOT'
#!/bin/sh
set -e
# Stopping vmlockd never touches a guest (the locks stay with the VMs' supervisors).
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
  systemctl disable --now vmlockd.socket vmlockd.service || true
fi
exit 0
EOT
cat >"$root/DEBIAN/postrm" <<'EOT'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
fi
if [ "$1" = purge ]; then
  rmdir /etc/vmlock 2>/dev/null || true
fi
exit 0
EOT
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

mkdir -p "$out"
deb=$out/vmlock_${version}_amd64.deb
dpkg-deb --root-owner-group "${compress[@]}" --build "$root" "$deb" >/dev/null
echo "$deb"
