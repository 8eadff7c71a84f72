#!/usr/bin/env bash
# One-command set-up for a fresh Debian 12 machine (Python 3.11, Go, root or sudo).
#
# Idempotent and fast on re-runs: every step first checks whether its result is
# already there (stamp file, binary version) and only then does the slow thing.
#
#   scripts/bootstrap.sh            # everything: system packages, .venv, btcd
#   scripts/bootstrap.sh system     # SoftHSM2, PostgreSQL and Chromium binaries (apt)
#   scripts/bootstrap.sh venv       # .venv with `pip install -e '.[dev]'`
#   scripts/bootstrap.sh btcd       # btcd into .cache/btcd/v$BTCD_VERSION/bin
#
# Environment: PYTHON (interpreter for the venv), BTCD_VERSION (default 0.26.0).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
BTCD_VERSION="${BTCD_VERSION:-0.26.0}"
BTCD_BIN_DIR="$ROOT/.cache/btcd/v$BTCD_VERSION/bin"
GO_CACHE_ROOT="$ROOT/.cache/go"

log() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { printf '[bootstrap] ERROR: %s\n' "$*" >&2; exit 1; }

# Run as root: directly when we are root, else through sudo (never prompts in CI: -n).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n -- "$@"
    else
        die "need root or sudo to run: $*"
    fi
}

# ---------------------------------------------------------------------------
# System packages: SoftHSM2 (bank HSM stand-in) and PostgreSQL server binaries.
# ---------------------------------------------------------------------------
have_postgres() { compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; }
have_softhsm() { command -v softhsm2-util >/dev/null 2>&1 && [ -e /usr/lib/softhsm/libsofthsm2.so ]; }
# The console's browser tests drive Debian's Chromium (no browser downloads here).
have_chromium() { [ -x /usr/bin/chromium ]; }
# The loan statement's PDF embeds DejaVu Sans (Cyrillic names): custody/reports/pdf.py.
have_dejavu() { [ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; }

POLICY_RC_D=/usr/sbin/policy-rc.d
CREATED_POLICY_RC_D=0
# Only ever remove the file we created (also on Ctrl-C / failure, via the EXIT trap).
remove_policy_rc_d() {
    if [ "$CREATED_POLICY_RC_D" -eq 1 ]; then
        as_root rm -f "$POLICY_RC_D"
        CREATED_POLICY_RC_D=0
    fi
}

step_system() {
    local missing=()
    have_softhsm || missing+=(softhsm2)
    have_postgres || missing+=(postgresql)
    have_chromium || missing+=(chromium)
    have_dejavu || missing+=(fonts-dejavu-core)
    if [ "${#missing[@]}" -eq 0 ]; then
        log "system packages present (softhsm2, postgresql, chromium)"
        return
    fi
    log "installing ${missing[*]} (apt)"
    # Tests start their own throwaway PostgreSQL; keep the package's postinst from
    # starting the system cluster. policy-rc.d exit 101 = "action forbidden".
    if [ ! -e "$POLICY_RC_D" ]; then
        trap remove_policy_rc_d EXIT
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $POLICY_RC_D && chmod 755 $POLICY_RC_D"
        CREATED_POLICY_RC_D=1
    fi
    local rc=0
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || rc=$?
    if [ "$rc" -eq 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${missing[@]}" || rc=$?
    fi
    remove_policy_rc_d
    [ "$rc" -eq 0 ] || die "apt-get failed for: ${missing[*]}"
    have_softhsm || die "softhsm2 installed but softhsm2-util/libsofthsm2.so not found"
    have_postgres || die "postgresql installed but no /usr/lib/postgresql/*/bin/initdb"
    have_chromium || die "chromium installed but /usr/bin/chromium not found"
}

# ---------------------------------------------------------------------------
# Python virtualenv, re-installed whenever pyproject.toml changes.
# ---------------------------------------------------------------------------
find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.11 python3; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return
        fi
    done
    die "need Python >= 3.11 with the venv module (set PYTHON=/path/to/python3.11)"
}

step_venv() {
    local stamp="$VENV/.bootstrap-stamp" want
    # The stamp covers what pip installs from: the dependency list and the interpreter.
    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
        local python
        python="$(find_python)"
        log "creating $VENV with $python"
        rm -rf "$VENV"
        "$python" -m venv "$VENV"
    fi
    want="$(cat "$ROOT/pyproject.toml" <("$VENV/bin/python" -VV) | sha256sum | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        log "venv up to date ($VENV)"
        return
    fi
    log "pip install -e '.[dev]' (pyproject.toml changed or first run)"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev]"
    printf '%s\n' "$want" >"$stamp"
}

# ---------------------------------------------------------------------------
# btcd (regtest node for tests and the demo), built from the Go module proxy.
# ---------------------------------------------------------------------------
btcd_ok() {
    local bin="$1"
    [ -x "$bin" ] || return 1
    # `btcd --version` prints e.g. "btcd version 0.26.0-beta".
    "$bin" --version 2>/dev/null | grep -Eq "version ${BTCD_VERSION//./\\.}([^0-9]|$)"
}

find_go() {
    if command -v go >/dev/null 2>&1; then
        command -v go
    elif [ -x /usr/local/go/bin/go ]; then
        echo /usr/local/go/bin/go
    else
        die "Go toolchain not found (need go >= 1.25 on PATH or in /usr/local/go)"
    fi
}

step_btcd() {
    local bin="$BTCD_BIN_DIR/btcd"
    if btcd_ok "$bin"; then
        log "btcd $BTCD_VERSION present ($bin)"
        return
    fi
    local go
    go="$(find_go)"
    log "building btcd v$BTCD_VERSION with $("$go" version) (cold: about 30 s)"
    rm -f "$bin"
    mkdir -p "$BTCD_BIN_DIR" "$GO_CACHE_ROOT"
    # Everything under .cache/ (git-ignored); -modcacherw keeps `make clean` able to
    # delete the module cache; pure Go, so no C compiler is needed.
    env GOBIN="$BTCD_BIN_DIR" \
        GOPATH="$GO_CACHE_ROOT/path" \
        GOMODCACHE="$GO_CACHE_ROOT/mod" \
        GOCACHE="$GO_CACHE_ROOT/build" \
        GOFLAGS="-modcacherw -buildvcs=false" \
        GOTOOLCHAIN="${GOTOOLCHAIN:-local}" \
        CGO_ENABLED=0 \
        "$go" install "github.com/btcsuite/btcd@v$BTCD_VERSION"
    btcd_ok "$bin" || die "built $bin but it does not report version $BTCD_VERSION"
    log "btcd ready: $bin"
}

main() {
    local steps=("$@")
    [ "${#steps[@]}" -gt 0 ] || steps=(system venv btcd)
    local step
    for step in "${steps[@]}"; do
        case "$step" in
            system) step_system ;;
            venv) step_venv ;;
            btcd) step_btcd ;;
            *) die "unknown step '$step' (system, venv, btcd)" ;;
        esac
    done
}

main "$@"
