#!/usr/bin/env bash
# Makes sure Debian's Mosquitto broker is installed (the tests start their own instances on
# free loopback ports; the system service is not used). Idempotent.
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]]; then
  exit 0
fi
if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "error: mosquitto is not installed. Install Debian's package: sudo apt-get install mosquitto" >&2
  exit 1
fi
echo "ensure-mosquitto: installing Debian's mosquitto package" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends mosquitto >&2
# The package enables a system broker on port 1883; tests never use it, so stop it if it runs.
if command -v systemctl >/dev/null 2>&1; then systemctl disable --now mosquitto >/dev/null 2>&1 || true; fi
