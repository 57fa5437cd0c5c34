#!/usr/bin/env bash
# Builds Prometheus' promtool with Go from the official Go module at the version pinned in
# hack/versions.env, and caches it under
# ${XDG_CACHE_HOME:-$HOME/.cache}/edgesync/promtool/<version>/. The tests use it to check the
# alert rules in deploy/monitoring. Idempotent: with the binary present it only prints its
# path. Prints the path of promtool on stdout as its last line.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

out="${XDG_CACHE_HOME:-$HOME/.cache}/edgesync/promtool/${PROMETHEUS_MODULE_VERSION}"
if [[ -x "$out/promtool" ]]; then
  echo "$out/promtool"
  exit 0
fi
if ! command -v go >/dev/null 2>&1; then
  echo "error: Go is needed to build promtool (the alert rules check); install Go >= 1.26" >&2
  exit 1
fi
echo "ensure-promtool: building promtool ${PROMETHEUS_MODULE_VERSION} from the Go module proxy (several minutes, once)" >&2
mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
GOBIN="$tmp" go install "github.com/prometheus/prometheus/cmd/promtool@${PROMETHEUS_MODULE_VERSION}" >&2
mv "$tmp/promtool" "$out/promtool"
echo "$out/promtool"
