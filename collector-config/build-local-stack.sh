#!/usr/bin/env bash
# Build/install the coworker demo stack's parts without Docker, pinned and cached:
#
#   otelcol     an OpenTelemetry Collector with exactly the components of otelcol-config.yaml,
#               made by the official builder (ocb) from builder-config.yaml       (needs Go)
#   jaeger      Jaeger v2 (`go install .../cmd/jaeger`; query API, no UI assets)  (needs Go)
#   prometheus  Debian's `prometheus` package (apt-get; needs root, else says what to run)
#   phoenix     arize-phoenix from PyPI, in its own virtualenv                    (needs python3)
#
# Usage: collector-config/build-local-stack.sh [PART ...]      (default: all four parts)
#
# Everything lands in a cache outside the repository, one directory per part and version
# (the collector's also keyed by a hash of the manifest), so a second run only checks that the
# binaries are there:  ${COWORKER_STACK_CACHE:-${XDG_CACHE_HOME:-~/.cache}/coworker-stack}
# The Go module and build caches live there too (a rebuild after a manifest change is fast).
#
# When it is done it prints the binaries' paths and writes them as shell assignments to
# $COWORKER_STACK_STATE/stack.env (default: the cache dir), then `ready` into
# $COWORKER_STACK_STATE/status, or `failed` if any part failed. The stack tests (tests/stack/)
# read that file, and under CI wait for `status` while this script runs in the background.
set -euo pipefail

OTELCOL_VERSION=0.161.0 # = the collector image tag in docker-compose.yaml
BUILDER_MODULE=go.opentelemetry.io/collector/cmd/builder
JAEGER_VERSION=2.11.0 # = the jaeger image tag in docker-compose.yaml
# Jaeger tags each v2 release with a v1 module version too (v2.N.0 = v1.(63+N).0): the Go
# module path has no /v2, so the go command only accepts the v1 tag.
JAEGER_MODULE_VERSION=v1.74.0
PHOENIX_VERSION=20.26.1

HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${COWORKER_STACK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/coworker-stack}"
STATE="${COWORKER_STACK_STATE:-$CACHE}"
mkdir -p "$CACHE" "$STATE"

PARTS=("$@")
[ "${1:-}" = "--part" ] && PARTS=("$2")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(otelcol jaeger prometheus phoenix)
for part in "${PARTS[@]}"; do
  case "$part" in
    otelcol | jaeger | prometheus | phoenix) ;;
    *) echo "build-local-stack: unknown part '$part' (otelcol, jaeger, prometheus, phoenix)" >&2; exit 2 ;;
  esac
done
want() { local p; for p in "${PARTS[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }

log() { printf '[build-local-stack %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# Go: persistent module/build caches in the cache dir; -trimpath for reproducible binaries;
# GOTOOLCHAIN=local so a go.mod asking for a newer Go fails loudly instead of downloading one.
go_env() {
  # Go's official tarball installs to /usr/local/go; a non-login shell may not have it on PATH.
  command -v go > /dev/null || export PATH="$PATH:/usr/local/go/bin"
  export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS=-trimpath GOTOOLCHAIN=local
  export CGO_ENABLED=0
}

build_otelcol() {
  go_env
  local key dir builder_dir work
  # The manifest is part of the key: adding a component gives a new directory, not a stale binary.
  key="$(sha256sum "$HERE/builder-config.yaml" | cut -c1-12)"
  dir="$CACHE/otelcol-coworker-$OTELCOL_VERSION-$key"
  if [ -x "$dir/otelcol-coworker" ]; then
    log "otelcol: cached $dir/otelcol-coworker"
  else
    builder_dir="$CACHE/builder-$OTELCOL_VERSION"
    if [ ! -x "$builder_dir/builder" ]; then
      log "otelcol: installing $BUILDER_MODULE@v$OTELCOL_VERSION"
      GOBIN="$builder_dir" go install "$BUILDER_MODULE@v$OTELCOL_VERSION"
    fi
    # Build in a scratch dir and move it into place at the end: an interrupted build never
    # leaves a directory that looks cached.
    work="$(mktemp -d "$CACHE/otelcol-build.XXXXXX")"
    sed "s|^  output_path: .*|  output_path: $work/src|" "$HERE/builder-config.yaml" > "$work/builder-config.yaml"
    log "otelcol: building (the first build takes minutes)"
    # The builder strips symbols (-s -w) unless debug_compilation is set in the manifest.
    "$builder_dir/builder" --config "$work/builder-config.yaml"
    mkdir -p "$work/out"
    mv "$work/src/otelcol-coworker" "$work/out/otelcol-coworker"
    rm -rf "$dir"
    mv "$work/out" "$dir"
    rm -rf "$work"
  fi
  OTELCOL_BIN="$dir/otelcol-coworker"
}

build_jaeger() {
  go_env
  local dir="$CACHE/jaeger-$JAEGER_VERSION" work gomod
  if [ -x "$dir/jaeger" ]; then
    log "jaeger: cached $dir/jaeger"
  else
    # `go install github.com/jaegertracing/jaeger/cmd/jaeger@VERSION` is refused: Jaeger's go.mod
    # has a replace directive (github.com/Shopify/sarama), and go install only builds modules
    # without one. So: a throw-away main module that requires Jaeger at the pinned version,
    # carries Jaeger's own replace directives, and builds cmd/jaeger. Dependency versions are
    # then the ones Jaeger's go.mod selects (minimal version selection), as in its own build.
    work="$(mktemp -d "$CACHE/jaeger-build.XXXXXX")"
    log "jaeger: building github.com/jaegertracing/jaeger/cmd/jaeger@$JAEGER_MODULE_VERSION (Jaeger v$JAEGER_VERSION)"
    cd "$work"
    go mod init coworker-stack/jaeger-build
    gomod="$(go mod download -json "github.com/jaegertracing/jaeger@$JAEGER_MODULE_VERSION" |
      sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
    [ -f "$gomod" ] || { echo "jaeger: cannot read Jaeger's go.mod" >&2; return 1; }
    grep '^replace ' "$gomod" | sed 's/^replace //; s/ => /=/; s/ \(v[^ ]*\)$/@\1/' |
      while read -r rep; do go mod edit -replace "$rep"; done
    go get "github.com/jaegertracing/jaeger/cmd/jaeger@$JAEGER_MODULE_VERSION"
    go build -ldflags="-s -w -X github.com/jaegertracing/jaeger/internal/version.latestVersion=v$JAEGER_VERSION" \
      -o "$work/out/jaeger" github.com/jaegertracing/jaeger/cmd/jaeger
    cd - > /dev/null
    rm -rf "$dir"
    mv "$work/out" "$dir"
    rm -rf "$work"
  fi
  JAEGER_BIN="$dir/jaeger"
}

install_prometheus() {
  local bin
  bin="$(command -v prometheus || true)"
  if [ -z "$bin" ]; then
    if [ "$(id -u)" -ne 0 ]; then
      log "prometheus: not installed; run: sudo apt-get install prometheus" >&2
      return 1
    fi
    log "prometheus: apt-get install prometheus (Debian)"
    export DEBIAN_FRONTEND=noninteractive
    # The package's maintainer scripts would start a Prometheus service (and node exporter)
    # on :9090; the tests start their own on a free port. policy-rc.d 101 = "do not start".
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' > "$policy"
      chmod +x "$policy"
      own_policy=1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus > /dev/null || {
      [ $own_policy -eq 1 ] && rm -f "$policy"
      return 1
    }
    [ $own_policy -eq 1 ] && rm -f "$policy"
    bin="$(command -v prometheus)"
  else
    log "prometheus: installed $bin"
  fi
  PROMETHEUS_BIN="$bin"
}

install_phoenix() {
  local dir="$CACHE/phoenix-$PHOENIX_VERSION"
  if [ -f "$dir/.installed" ] && [ -x "$dir/bin/phoenix" ]; then
    log "phoenix: cached $dir"
  else
    # A venv cannot be moved into place after it is built (its scripts name their own path), so
    # it is built in place and marked complete only once pip has succeeded.
    rm -rf "$dir"
    log "phoenix: pip install arize-phoenix==$PHOENIX_VERSION into $dir"
    python3 -m venv "$dir"
    "$dir/bin/pip" install --quiet --disable-pip-version-check "arize-phoenix==$PHOENIX_VERSION"
    touch "$dir/.installed"
  fi
  PHOENIX_BIN="$dir/bin/phoenix"
}

# One part, in a child shell of its own: errexit is ignored inside a function called as
# `f || ...`, so each part runs as `bash $0 --part NAME`, where any failing command stops it.
# The child writes the binary's path to $STATE/.NAME.
if [ "${1:-}" = "--part" ]; then
  trap - EXIT
  case "$2" in
    otelcol) build_otelcol; echo "$OTELCOL_BIN" > "$STATE/.otelcol" ;;
    jaeger) build_jaeger; echo "$JAEGER_BIN" > "$STATE/.jaeger" ;;
    prometheus) install_prometheus; echo "$PROMETHEUS_BIN" > "$STATE/.prometheus" ;;
    phoenix) install_phoenix; echo "$PHOENIX_BIN" > "$STATE/.phoenix" ;;
  esac
  exit 0
fi

echo building > "$STATE/status"
echo $$ > "$STATE/pid"
# Anything that goes wrong leaves `failed`, so a waiting test stops waiting.
trap 'rc=$?; [ $rc -ne 0 ] && echo failed > "$STATE/status"; exit $rc' EXIT

failed=()
run_part() {
  rm -f "$STATE/.$1"
  if bash "$0" --part "$1" && [ -s "$STATE/.$1" ]; then
    return 0
  fi
  log "$1: FAILED" >&2
  failed+=("$1")
}

# Phoenix's pip install is mostly downloading: it runs beside the Go builds, which use the CPUs.
if want phoenix; then
  bash "$0" --part phoenix > "$STATE/phoenix.log" 2>&1 &
  phoenix_pid=$!
fi
if want prometheus; then run_part prometheus; fi
if want otelcol; then run_part otelcol; fi
if want jaeger; then run_part jaeger; fi
if want phoenix; then
  wait "$phoenix_pid" || true
  cat "$STATE/phoenix.log"
  [ -s "$STATE/.phoenix" ] || { log "phoenix: FAILED" >&2; failed+=(phoenix); }
fi

path_of() { cat "$STATE/.$1" 2> /dev/null || true; }
OTELCOL_BIN="$(path_of otelcol)" JAEGER_BIN="$(path_of jaeger)"
PROMETHEUS_BIN="$(path_of prometheus)" PHOENIX_BIN="$(path_of phoenix)"
rm -f "$STATE/.otelcol" "$STATE/.jaeger" "$STATE/.prometheus" "$STATE/.phoenix"

{
  echo "# written by collector-config/build-local-stack.sh"
  echo "OTELCOL_VERSION=$OTELCOL_VERSION"
  echo "JAEGER_VERSION=$JAEGER_VERSION"
  echo "PHOENIX_VERSION=$PHOENIX_VERSION"
  echo "OTELCOL_BIN=$OTELCOL_BIN"
  echo "JAEGER_BIN=$JAEGER_BIN"
  echo "PROMETHEUS_BIN=$PROMETHEUS_BIN"
  echo "PHOENIX_BIN=$PHOENIX_BIN"
} > "$STATE/stack.env.tmp"
mv "$STATE/stack.env.tmp" "$STATE/stack.env"

echo "coworker local stack ($STATE/stack.env):"
echo "  collector   ${OTELCOL_BIN:-(not built)}"
echo "  jaeger      ${JAEGER_BIN:-(not built)}"
echo "  prometheus  ${PROMETHEUS_BIN:-(not installed)}"
echo "  phoenix     ${PHOENIX_BIN:-(not installed)}"

if [ ${#failed[@]} -ne 0 ]; then
  echo "build-local-stack: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo ready > "$STATE/status"
