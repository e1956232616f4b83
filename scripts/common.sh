# Sourced by the scripts in this folder: paths and the shared build step.
KEEL_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Downloads, built kits and ccache live outside the clone so a fresh clone
# (and CI) reuses them.
export KEEL_CACHE_DIR=${KEEL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/keel}
export CCACHE_DIR=${CCACHE_DIR:-$KEEL_CACHE_DIR/ccache}
export CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-5G}
# Hash paths relative to the clone, so worktrees and fresh clones hit the cache.
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$KEEL_ROOT}
mkdir -p "$KEEL_CACHE_DIR" "$CCACHE_DIR"

# keel_build DIR [cmake args...]: configure (once) and build with Ninja.
keel_build() {
  local dir=$1
  shift
  if [[ ! -f "$dir/build.ninja" ]]; then
    cmake -S "$KEEL_ROOT" -B "$dir" -G Ninja "$@"
  fi
  cmake --build "$dir"
}
