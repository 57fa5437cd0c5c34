#!/usr/bin/env bash
# Makes a Python virtual environment with pysparkplug (an independent Sparkplug B
# implementation from PyPI) for the Sparkplug B tests, under
# ${XDG_CACHE_HOME:-$HOME/.cache}/edgesync/pysparkplug/<hash of the pinned requirements>/.
# Idempotent: with the environment present it only prints its python. Prints the path of the
# environment's python on stdout as its last line.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

key="$(printf '%s' "$PYSPARKPLUG_REQUIREMENTS" | sha256sum | cut -c1-12)"
out="${XDG_CACHE_HOME:-$HOME/.cache}/edgesync/pysparkplug/$key"
py="$out/bin/python"
if [[ -x "$py" && -f "$out/.complete" ]]; then
  echo "$py"
  exit 0
fi
if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: Python 3 with venv is missing. Install it: sudo apt-get install python3 python3-venv" >&2
    exit 1
  fi
  echo "ensure-pysparkplug: installing Debian's python3 and python3-venv" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends python3 python3-venv >&2
fi
echo "ensure-pysparkplug: creating $out with $PYSPARKPLUG_REQUIREMENTS" >&2
rm -rf "$out"
python3 -m venv "$out" >&2
# shellcheck disable=SC2086 # the requirements are words
"$py" -m pip install --quiet --disable-pip-version-check $PYSPARKPLUG_REQUIREMENTS >&2
"$py" -c 'import pysparkplug' >&2
touch "$out/.complete"
echo "$py"
