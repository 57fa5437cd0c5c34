#!/usr/bin/env bash
# Makes sure this machine can cross-build the agent for ARM and boot it under full-system
# emulation. Idempotent: with everything present it only checks (well under a second).
#
# - Cross builds use Debian's `rustc-web` (/usr/bin/rustc), whose standard library installs per
#   architecture through multiarch (libstd-rust-web-dev:arm64 / :armhf), with rustup's cargo:
#   rustup cannot add targets on machines without access to static.rust-lang.org.
# - Emulation is qemu-system (qemu-user hangs at the first pthread_create on some hosts, see
#   docs/arm.md). The guest is Debian's own kernel for each architecture and a busybox
#   initramfs built by hack/arm-image.sh; both packages are downloaded into the cache, never
#   installed on this machine.
#
# Cache: ${XDG_CACHE_HOME:-$HOME/.cache}/edgesync/arm/<arch>/ (vmlinuz, modules/, busybox).
set -euo pipefail

cache="${XDG_CACHE_HOME:-$HOME/.cache}/edgesync/arm"
log() { echo "ensure-arm: $*" >&2; }

# Debian architecture -> the packages its kernel and busybox come from.
declare -A kernel_meta=([arm64]=linux-image-arm64 [armhf]=linux-image-armmp)
# The virtio PCI transport, network and block drivers, and ext4 (the tests' persistent disk),
# with what they need; the rest is built in. ext4 asks the crypto API for crc32c by name at
# mount time, which no module dependency records.
modules=(virtio_pci virtio_net virtio_blk crc32c_generic ext4)

packages=(rustc-web libstd-rust-web-dev:arm64 libstd-rust-web-dev:armhf
  gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf libc6-dev-arm64-cross libc6-dev-armhf-cross
  qemu-system-arm cpio binutils)

missing=()
for p in "${packages[@]}"; do
  if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]]; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: missing Debian packages for the ARM build: ${missing[*]}" >&2
    echo "       As root: dpkg --add-architecture arm64 && dpkg --add-architecture armhf && apt-get update && apt-get install ${missing[*]}" >&2
    exit 1
  fi
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  dpkg --add-architecture arm64
  dpkg --add-architecture armhf
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${packages[@]}" >&2
fi

# The modules `name` needs, dependencies first, from each .ko's own modinfo section (the .deb
# ships no modules.dep, and kmod's tools may be absent).
ko_path() { find "$1" -name "$2.ko" -print -quit; }
resolve() {
  local tree="$1" name="$2" ko dep
  [[ " ${resolved[*]:-} " == *" $name "* ]] && return 0
  ko="$(ko_path "$tree" "$name")"
  [[ -n "$ko" ]] || { echo "error: module $name not found in $tree" >&2; exit 1; }
  for dep in $(strings -a "$ko" | sed -n 's/^depends=//p' | tr ',' ' '); do
    resolve "$tree" "$dep"
  done
  resolved+=("$name")
}

for arch in arm64 armhf; do
  out="$cache/$arch"
  meta="${kernel_meta[$arch]}"
  # The versioned kernel package the meta package points at today (e.g. linux-image-6.1.0-57-arm64).
  kpkg="$(apt-cache depends "$meta:$arch" | awk '/Depends: linux-image-/ { print $2; exit }')"
  kpkg="${kpkg%%:*}"
  [[ -n "$kpkg" ]] || { echo "error: cannot resolve $meta:$arch (apt-get update?)" >&2; exit 1; }
  stamp="kernel=$kpkg modules=${modules[*]} busybox=$(apt-cache policy "busybox-static:$arch" | awk '/Candidate:/ { print $2 }')"
  if [[ -f "$out/.stamp" && "$(cat "$out/.stamp")" == "$stamp" ]]; then
    continue
  fi
  log "fetching $kpkg and busybox-static for $arch"
  rm -rf "$out"
  mkdir -p "$out/modules"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  chmod 0777 "$work" # apt downloads as its sandbox user, which must be able to write here
  if ! (cd "$work" && apt-get download -qq "$kpkg:$arch" "busybox-static:$arch"); then
    # Package lists older than the mirror name versions it no longer serves: refresh once.
    log "download failed; refreshing the package lists and trying again"
    apt-get update -qq >&2
    kpkg="$(apt-cache depends "$meta:$arch" | awk '/Depends: linux-image-/ { print $2; exit }')"
    kpkg="${kpkg%%:*}"
    (cd "$work" && apt-get download -qq "$kpkg:$arch" "busybox-static:$arch")
  fi
  dpkg-deb -x "$work"/linux-image-*.deb "$work/kernel"
  dpkg-deb -x "$work"/busybox-static_*.deb "$work/busybox"
  cp "$work"/kernel/boot/vmlinuz-* "$out/vmlinuz"
  cp "$work/busybox/bin/busybox" "$out/busybox"
  resolved=()
  for m in "${modules[@]}"; do resolve "$work/kernel/lib/modules" "$m"; done
  for m in "${resolved[@]}"; do cp "$(ko_path "$work/kernel/lib/modules" "$m")" "$out/modules/"; done
  # Load order for the guest's /init.
  printf '%s\n' "${resolved[@]}" >"$out/modules/order"
  rm -rf "$work"
  trap - EXIT
  echo "$stamp" >"$out/.stamp"
done
echo "$cache"
