#!/usr/bin/env bash
# Prepare a Jetson Orin for trt_gemma: NVMe swap (for conversion/builds), max power mode, clocks, optional headless boot.
# Facts and sources: docs/jetson.md (jetson-containers docs/setup.md; TensorRT-LLM README4Jetson.md).
# Usage: sudo jetson/setup.sh [--swap-dir /mnt/nvme] [--swap-gb 16] [--headless] [--power-mode 0]
set -euo pipefail

swap_dir=/mnt; swap_gb=16; headless=0; power_mode=0
while [ $# -gt 0 ]; do
  case "$1" in
    --swap-dir) swap_dir=$2; shift 2 ;;
    --swap-gb) swap_gb=$2; shift 2 ;;
    --headless) headless=1; shift ;;
    --power-mode) power_mode=$2; shift 2 ;;
    -h|--help) sed -n 2,4p "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

[ "$(id -u)" -eq 0 ] || { echo "run as root (sudo)" >&2; exit 2; }
[ -f /etc/nv_tegra_release ] || { echo "not a Jetson (/etc/nv_tegra_release missing)" >&2; exit 2; }
head -n1 /etc/nv_tegra_release

# Swap on NVMe, not eMMC/microSD (a performance cliff and flash wear). zram competes for the same RAM: disable it.
swap_file="$swap_dir/${swap_gb}GB.swap"
if ! swapon --show=NAME --noheadings | grep -qx "$swap_file"; then
  systemctl disable --now nvzramconfig 2>/dev/null || true
  fallocate -l "${swap_gb}G" "$swap_file"
  chmod 600 "$swap_file"
  mkswap "$swap_file"
  swapon "$swap_file"
  grep -q "^$swap_file " /etc/fstab || echo "$swap_file  none  swap  sw 0  0" >> /etc/fstab
fi

# Mode IDs differ per board: print them so the user can check what mode 0 means here.
nvpmodel -p --verbose 2>/dev/null | grep -E "POWER_MODEL|NAME" | head -n 20 || true
nvpmodel -m "$power_mode" || echo "nvpmodel -m $power_mode needs confirmation or a reboot on this board" >&2
jetson_clocks || true  # does not persist across boots; jetson/trt-gemma.service runs it in ExecStartPre

if [ "$headless" -eq 1 ]; then
  systemctl set-default multi-user.target  # frees ~250-800 MB of shared memory after the next boot
fi
free -h
