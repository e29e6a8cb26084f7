#!/usr/bin/env bash
# The main job, end to end: a QEMU guest runs under vmlock's disk lease on the embedded default
# (the CLI starts its own vmlockd), a second VM asking for the same disk is refused and told who
# holds it, and the disk is free again once the guest quits.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-system-x86_64 >/dev/null || bash scripts/install-test-deps.sh
cargo build --release -q -p vmlock-cli -p vmlockd
vmlock=target/release/vmlock
work=$(mktemp -d /var/tmp/vmlock-demo.XXXXXX)
export VMLOCK_RUNTIME_DIR="$work/run"
cleanup() {
  [ -n "${guest:-}" ] && kill "$guest" 2>/dev/null || true
  [ -f "$work/run/vmlockd.pid" ] && kill "$(cat "$work/run/vmlockd.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

qemu-img create -q -f qcow2 "$work/demo.qcow2" 64M
echo "== starting VM \"demo\" under vmlock (QEMU, TCG, no OS)"
"$vmlock" run --name demo --disk "$work/demo.qcow2" -- \
  qemu-system-x86_64 -nodefaults -display none -machine q35,accel=tcg -m 64 \
    -qmp "unix:$work/qmp.sock,server=on,wait=off" \
    -blockdev "driver=file,filename=$work/demo.qcow2,node-name=f0" \
    -blockdev driver=qcow2,file=f0,node-name=d0 -device virtio-blk-pci,drive=d0 &
guest=$!
for _ in $(seq 200); do [ -S "$work/qmp.sock" ] && break; sleep 0.05; done

echo "== vmlock status"
"$vmlock" status
echo "== a second VM asks for the same disk"
if "$vmlock" run --name intruder --disk "$work/demo.qcow2" -- true; then
  echo "BUG: the second VM got the disk" >&2; exit 1
fi
echo "== quitting the guest over QMP"
python3 - "$work/qmp.sock" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
f.readline()
for cmd in ("qmp_capabilities", "quit"):
    f.write(json.dumps({"execute": cmd}) + "\n"); f.flush(); f.readline()
PY
wait "$guest" || true
guest=
echo "== the disk is free again"
"$vmlock" run --name next --disk "$work/demo.qcow2" -- true && echo "VM \"next\" got the disk"
