#!/usr/bin/env bash
# Makes sure Debian's Mosquitto broker and clients (mosquitto_pub/sub, for the TLS tests) and
# the openssl CLI (test certificates) are installed. The tests start their own broker
# instances on free loopback ports; the system service is not used. Idempotent.
set -euo pipefail
if { command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]]; } \
  && command -v mosquitto_pub >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1; then
  exit 0
fi
if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "error: mosquitto, mosquitto-clients or openssl is missing. Install Debian's packages: sudo apt-get install mosquitto mosquitto-clients openssl" >&2
  exit 1
fi
echo "ensure-mosquitto: installing Debian's mosquitto, mosquitto-clients and openssl" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends mosquitto mosquitto-clients openssl >&2
# The package enables a system broker on port 1883; tests never use it, so stop it if it runs.
if command -v systemctl >/dev/null 2>&1; then systemctl disable --now mosquitto >/dev/null 2>&1 || true; fi
