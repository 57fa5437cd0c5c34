#!/usr/bin/env bash
# Builds kube-apiserver, kubectl and etcd with Go from the official Go modules at the versions
# pinned in hack/versions.env, and caches them under
# ${XDG_CACHE_HOME:-$HOME/.cache}/edgesync/k8s/v<K8S_VERSION>/. Idempotent: a second run with the
# binaries present only checks them and prints the directory (takes well under a second).
# Prints the binary directory on stdout as its last line.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/edgesync/k8s"
out="$cache_root/v${K8S_VERSION}"
bins=(kube-apiserver kubectl etcd)

have_all() {
  for b in "${bins[@]}"; do [[ -x "$out/$b" ]] || return 1; done
  [[ -f "$out/.stamp" ]] && [[ "$(cat "$out/.stamp")" == "k8s=${K8S_VERSION} etcd=${ETCD_VERSION}" ]]
}

if have_all; then
  echo "$out"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  echo "error: Go is required to build the Kubernetes test control plane (kube-apiserver, kubectl, etcd)." >&2
  echo "       Install Go >= 1.26 (https://go.dev/doc/install or 'apt-get install golang' if new enough) and re-run." >&2
  exit 1
fi

log() { echo "ensure-k8s: $*" >&2; }
mkdir -p "$out"
work="$cache_root/build-v${K8S_VERSION}"
mkdir -p "$work/k8s" "$work/etcd"
export GOFLAGS="${GOFLAGS:-} -mod=mod"
export CGO_ENABLED=0

log "building Kubernetes v${K8S_VERSION} (kube-apiserver, kubectl); first run takes several minutes"
(
  cd "$work/k8s"
  if ! go mod download -json "k8s.io/kubernetes@v${K8S_VERSION}" >/dev/null 2>dl.err; then
    cat dl.err >&2
    echo "error: cannot download k8s.io/kubernetes@v${K8S_VERSION} from the Go module proxy (GOPROXY=$(go env GOPROXY))." >&2
    exit 1
  fi
  kdir="$(go mod download -json "k8s.io/kubernetes@v${K8S_VERSION}" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  minor="${K8S_VERSION#*.}"; minor="${minor%%.*}"
  {
    echo "module edgesync.local/k8sbuild"
    echo
    echo "go 1.26"
    echo
    echo "require k8s.io/kubernetes v${K8S_VERSION}"
    echo
    # k8s.io/kubernetes replaces its staging modules with local paths; a consumer must replace
    # them with the published v0.<minor>.<patch> tags instead.
    sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#replace \1 => \1 v0.'"${K8S_VERSION#*.}"'#p' "$kdir/go.mod"
  } >go.mod
  go get "k8s.io/kubernetes/cmd/kube-apiserver@v${K8S_VERSION}" "k8s.io/kubernetes/cmd/kubectl@v${K8S_VERSION}" >&2
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X ${pkg}.gitVersion=v${K8S_VERSION} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor} -X ${pkg}.gitTreeState=clean"
  done
  go build -trimpath -ldflags "$ldflags" -o "$out/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl
)

log "building etcd v${ETCD_VERSION}"
(
  cd "$work/etcd"
  cat >go.mod <<MOD
module edgesync.local/etcdbuild

go 1.26
MOD
  cat >main.go <<'GO'
// Command etcd is the upstream etcd server entry point, built from go.etcd.io/etcd/server/v3.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  go get "go.etcd.io/etcd/server/v3@v${ETCD_VERSION}" >&2
  go mod tidy >&2
  go build -trimpath -ldflags "-s -w" -o "$out/etcd" .
)

for b in "${bins[@]}"; do
  [[ -x "$out/$b" ]] || { echo "error: $out/$b was not built" >&2; exit 1; }
done
echo "k8s=${K8S_VERSION} etcd=${ETCD_VERSION}" >"$out/.stamp"
log "done: $out"
echo "$out"
