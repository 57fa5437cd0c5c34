#!/usr/bin/env bash
# `make arm`: builds the agent alone for aarch64 and armv7 (armhf) with the release-small
# profile, then the boot image the emulated tests use for each (Debian's kernel plus a busybox
# initramfs holding the agent). Cached: cargo rebuilds only what changed, and an image is
# rebuilt only when its agent or kernel is newer.
#
# Output, per target triple:
#   target/cross/<triple>/release-small/edgesync-agent   the stripped binary that ships
#   target/cross/<triple>/vm/{vmlinuz,initrd.gz,qemu}    what tests/src/vm.rs boots
#
# The agent is built on its own, never together with the controller: cargo unifies the
# features of shared dependencies across the packages of one invocation, and the agent would
# ship (and be measured) larger than it is.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cache="$("$here/ensure-arm.sh")"
target_dir="$root/target/cross"
log() { echo "build-arm: $*" >&2; }

# triple  debian-arch  gcc-prefix  qemu-system  machine/cpu
targets=(
  "aarch64-unknown-linux-gnu arm64 aarch64-linux-gnu qemu-system-aarch64 -M virt -cpu cortex-a57"
  # highmem=off: the 32-bit kernel cannot reach the PCI ECAM window above 4 GiB.
  "armv7-unknown-linux-gnueabihf armhf arm-linux-gnueabihf qemu-system-arm -M virt,highmem=off -cpu cortex-a15"
)

# Built agents, by a hash of everything that goes into them, outside the clone.
agent_cache="${XDG_CACHE_HOME:-$HOME/.cache}/edgesync/arm-agent"

# A hash of the agent's inputs for `triple` (built with the C cross-compiler `prefix`-gcc,
# which also compiles SQLite and ring): its sources and its dependencies' (the workspace
# manifests and lock file), the compilers, the flags the environment gives them, and this
# script.
inputs_hash() {
  {
    echo "$1"
    /usr/bin/rustc -V
    "${CARGO:-cargo}" -V
    "$2-gcc" --version | head -1
    env | sort | grep -E '^(RUSTFLAGS|CARGO_ENCODED_RUSTFLAGS|CFLAGS|CARGO_PROFILE_[A-Z_]+)=' || true
    (cd "$root" && find agent protocol -type f \( -name '*.rs' -o -name Cargo.toml \) -print0 \
      | sort -z | xargs -0 sha256sum)
    sha256sum "$root/Cargo.toml" "$root/Cargo.lock" "$here/build-arm.sh" | sed "s|$root/||"
  } | sha256sum | cut -c1-16
}

only="${ARM_TARGETS:-}"
for spec in "${targets[@]}"; do
  read -r triple arch prefix qemu machine <<<"$spec"
  [[ -z "$only" || " $only " == *" $triple "* ]] || continue
  env_triple="${triple//-/_}"
  upper="$(tr '[:lower:]' '[:upper:]' <<<"$env_triple")"
  start=$SECONDS
  bin="$target_dir/$triple/release-small/edgesync-agent"
  # A fresh clone finds the binary its sources were last built into outside the clone.
  key="$(inputs_hash "$triple" "$prefix")"
  cached="$agent_cache/$triple/$key/edgesync-agent"
  if [[ -f "$cached" && ! -f "$bin" ]]; then
    mkdir -p "$(dirname "$bin")"
    cp "$cached" "$bin"
    log "$triple: $(stat -c %s "$bin") bytes, from the cache (inputs $key)"
  else
    # Debian's rustc has the ARM standard libraries; rustup's cargo drives it.
    env RUSTC=/usr/bin/rustc \
      "CARGO_TARGET_${upper}_LINKER=$prefix-gcc" \
      "CC_${env_triple}=$prefix-gcc" "AR_${env_triple}=$prefix-ar" \
      "${CARGO:-cargo}" build -q --profile release-small --target "$triple" \
      -p edgesync-agent --bin edgesync-agent --target-dir "$target_dir"
    log "$triple: $(stat -c %s "$bin") bytes, cargo took $((SECONDS - start)) s"
    if [[ ! -f "$cached" ]]; then
      # The newest few builds per target are kept.
      mkdir -p "$(dirname "$cached")"
      cp "$bin" "$cached.$$" && mv "$cached.$$" "$cached"
      ls -1dt "$agent_cache/$triple"/*/ | tail -n +4 | xargs -r -d '\n' rm -rf
    fi
  fi

  vm="$target_dir/$triple/vm"
  mkdir -p "$vm"
  if [[ -f "$vm/initrd.gz" && "$vm/initrd.gz" -nt "$bin" && "$vm/initrd.gz" -nt "$cache/$arch/.stamp" \
    && "$vm/initrd.gz" -nt "$here/build-arm.sh" ]]; then
    continue
  fi
  img="$(mktemp -d)"
  trap 'rm -rf "$img"' EXIT
  mkdir -p "$img"/{bin,lib/modules,proc,sys,dev,tmp,etc/edgesync,var/lib/edgesync,var/log}
  cp "$cache/$arch/busybox" "$img/bin/busybox"
  cp "$cache/$arch/modules/"* "$img/lib/modules/"
  cp "$bin" "$img/bin/edgesync-agent"
  # The dynamic loader and every library the agent names, from the cross toolchain's sysroot.
  sysroot="/usr/$prefix/lib"
  interp="$("$prefix-readelf" -l "$bin" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')"
  cp -L "$sysroot/$(basename "$interp")" "$img/lib/"
  for lib in $("$prefix-readelf" -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p'); do
    cp -L "$sysroot/$lib" "$img/lib/"
  done
  cat >"$img/init" <<'EOF'
#!/bin/busybox sh
# The emulated edge box: mounts, the virtio network at QEMU's user-mode address, then a
# command loop on the serial console for the test harness (tests/src/vm.rs): one command per
# line, its output, then "@@done <exit code>".
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m.ko"; done
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ip route add default via 10.0.2.2
# With a disk (the harness adds "edgesync.disk" to the kernel command line), the data dir
# lives on it and survives power cuts of the emulator.
if grep -q edgesync.disk /proc/cmdline; then
  for _ in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
  mount -t ext4 /dev/vda /var/lib/edgesync || echo "EDGESYNC-VM-DISK-FAILED"
fi
stty -echo 2>/dev/null
echo "EDGESYNC-VM-READY $(uname -m)"
while IFS= read -r line; do
  sh -c "$line" </dev/null 2>&1
  echo "@@done $?"
done
poweroff -f
EOF
  chmod +x "$img/init"
  (cd "$img" && find . | cpio -o -H newc -R 0:0 --quiet | gzip -6 >"$vm/initrd.gz.tmp")
  mv "$vm/initrd.gz.tmp" "$vm/initrd.gz"
  cp "$cache/$arch/vmlinuz" "$vm/vmlinuz"
  echo "$qemu $machine" >"$vm/qemu"
  rm -rf "$img"
  trap - EXIT
  log "$triple: boot image $vm ($(stat -c %s "$vm/initrd.gz") bytes initrd)"
done
