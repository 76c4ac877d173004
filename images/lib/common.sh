# shellcheck shell=bash
# Shared helpers for the images/build-*.sh scripts (sourced, not executed).
#
# Conventions every build script follows:
#   * progress and tool output go to stderr; only result paths go to stdout
#     (this file moves the real stdout to fd 3 and points fd 1 at stderr;
#     `emit PATH...` writes to the saved stdout);
#   * results are cached in ${SSI_CACHE:-$HOME/.cache/ssi-vmm}/<name>-<hash>/,
#     hash = sha256 over the script, the helper files it uses and its inputs
#     (package versions etc.), first 16 hex digits;
#   * a build happens in a temporary directory next to the cache entry and is
#     renamed into place at the end, so an interrupted build never leaves a
#     half-written entry. A lock file serialises concurrent builds of one entry.

exec 3>&1 1>&2

# shellcheck disable=SC2034  # used by the scripts that source this
SSI_IMAGES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SSI_CACHE_ROOT=${SSI_CACHE:-$HOME/.cache/ssi-vmm}
: "${SSI_NAME:=images}"

log() { printf '[%s] %s\n' "$SSI_NAME" "$*" >&2; }
die() { log "error: $*"; exit 1; }
emit() { printf '%s\n' "$@" >&3; }

# need_pkgs PKG...: install the Debian packages that are not installed yet.
need_pkgs() {
  local missing=() p
  for p in "$@"; do
    if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
      missing+=("$p")
    fi
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing packages ${missing[*]} and not root: install them first"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
    log "install failed; running apt-get update and retrying"
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
  fi
}

# pkg_installed_version PKG: version of an installed package.
pkg_installed_version() { dpkg-query -W -f='${Version}' "$1"; }

# pkg_candidate_version PKG: the version apt would install (runs apt-get update once if unknown).
pkg_candidate_version() {
  local v
  v=$(apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }')
  if [ -z "$v" ] || [ "$v" = "(none)" ]; then
    log "no candidate for $1; running apt-get update"
    apt-get update -q >&2
    v=$(apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }')
  fi
  if [ -z "$v" ] || [ "$v" = "(none)" ]; then die "apt knows no candidate version of $1"; fi
  printf '%s\n' "$v"
}

# cache_key FILE_OR_DIR... : hash of the given files (directories recursively, in sorted
# order, by relative path and content) plus whatever is on stdin (the other inputs).
cache_key() {
  {
    local f
    for f in "$@"; do
      if [ -d "$f" ]; then
        printf 'dir %s\n' "$(basename "$f")"
        (cd "$f" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum)
      else
        printf '%s  %s\n' "$(sha256sum < "$f" | cut -d' ' -f1)" "$(basename "$f")"
      fi
    done
    cat
  } | sha256sum | cut -c1-16
}

# cache_lookup NAME KEY: sets CACHE_OUT; returns 0 if that entry already exists.
cache_lookup() {
  CACHE_OUT=$SSI_CACHE_ROOT/$1-$2
  [ -d "$CACHE_OUT" ]
}

# cache_begin: lock the entry named by the last cache_lookup. If another process finished
# it while we waited for the lock, sets CACHE_HIT=1; otherwise makes CACHE_TMP, a fresh build
# directory on the same file system, removed again on exit unless cache_commit ran.
cache_begin() {
  local lock
  CACHE_HIT=
  mkdir -p "$SSI_CACHE_ROOT/.locks"
  lock="$SSI_CACHE_ROOT/.locks/$(basename "$CACHE_OUT").lock"
  exec 9>"$lock"
  if ! flock -n 9; then
    log "another build of $(basename "$CACHE_OUT") is running; waiting for it"
    flock 9
  fi
  if [ -d "$CACHE_OUT" ]; then
    # shellcheck disable=SC2034  # read by the caller
    CACHE_HIT=1
    return 0
  fi
  # Leftovers of a build of this entry that was killed hard (we hold the lock, so no live
  # build owns them).
  local old
  for old in "$SSI_CACHE_ROOT/.$(basename "$CACHE_OUT").tmp."*; do
    [ -d "$old" ] || continue
    log "removing leftover $old"
    umount_below "$old"
    rm -rf --one-file-system "$old"
  done
  CACHE_TMP=$(mktemp -d "$SSI_CACHE_ROOT/.$(basename "$CACHE_OUT").tmp.XXXXXX")
  trap cache_abort EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM HUP
}

# Unmount anything left mounted below $1 (e.g. by an interrupted debootstrap), deepest first.
umount_below() {
  local m
  awk -v p="$1/" 'index($2, p) == 1 { print $2 }' /proc/self/mounts | sort -r |
    while IFS= read -r m; do umount -l "$m" 2>/dev/null || true; done
}

cache_abort() {
  local rc=$?
  if [ -n "${CACHE_TMP:-}" ] && [ -d "$CACHE_TMP" ]; then
    [ $rc -ne 0 ] && log "build failed (exit $rc); removing $CACHE_TMP"
    umount_below "$CACHE_TMP"
    rm -rf --one-file-system "$CACHE_TMP"
  fi
  return $rc
}

# cache_commit: atomically move the finished CACHE_TMP into place as CACHE_OUT.
cache_commit() {
  chmod 755 "$CACHE_TMP"
  mv -T "$CACHE_TMP" "$CACHE_OUT"
  CACHE_TMP=
  trap - EXIT
}
