#!/bin/bash
# setup-rdma.sh: install what the `verbs` transport and the Soft-RoCE test VM need.
#
# Idempotent; run as root (or with sudo) on Debian/Ubuntu. Installs:
#   - build:   cmake, clang, libclang-dev, pkg-config (bindgen/cmake for the `verbs` feature)
#   - RDMA:    rdma-core, libibverbs-dev, librdmacm-dev, ibverbs-providers (rxe), ibverbs-utils, perftest
#   - test VM: qemu-system-x86, linux-image-amd64 (ships rdma_rxe.ko), busybox-static, kmod,
#              cpio, iproute2, zstd, xz-utils (see scripts/softroce-test.sh)
# Set SKIP_APT_UPDATE=1 to skip `apt-get update` (offline mirrors, repeated runs).
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  exec sudo -E "$0" "$@"
fi

export DEBIAN_FRONTEND=noninteractive
PKGS=(
  cmake clang libclang-dev pkg-config
  rdma-core libibverbs-dev librdmacm-dev ibverbs-providers ibverbs-utils perftest
  qemu-system-x86 linux-image-amd64 busybox-static kmod cpio iproute2 zstd xz-utils
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup-rdma: all packages already installed"
else
  echo "setup-rdma: installing ${missing[*]}"
  if [ "${SKIP_APT_UPDATE:-0}" != 1 ]; then
    apt-get update -o DPkg::Lock::Timeout=300
  fi
  apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=300 "${missing[@]}"
fi

# Installing qemu-system-x86 can remove a newer, separately installed qemu-utils; qemu-img
# is not needed by the test VM, so this only reports it.
command -v qemu-img >/dev/null 2>&1 || echo "setup-rdma: note: qemu-img is not installed (not needed by softroce-test.sh)"

kver=$(ls /lib/modules 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$kver" ] || ! modinfo -k "$kver" -n rdma_rxe >/dev/null 2>&1; then
  echo "setup-rdma: error: no installed kernel ships rdma_rxe (looked in /lib/modules/$kver)" >&2
  exit 1
fi
echo "setup-rdma: done; guest kernel $kver has rdma_rxe; $(command -v qemu-system-x86_64)"
