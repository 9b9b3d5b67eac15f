# shellcheck shell=bash
# Sourced by every bench/ script: what a script starts ends with it, however it ends.
#
# - "${guard[@]}" prefixes every server, load generator and profiler: the kernel kills it
#   (SIGKILL) when the script's process dies, SIGKILL included, which no trap sees. The
#   signal is bound to the process that forks the child, so start them from the script's
#   own shell: a command inside $(...), or a function in a pipeline, runs in a subshell that
#   would outlive a killed script. Write their output to a file and read it afterwards.
# - Scratch directories (scratch_dir) live under target/bench-runs/<script pid>/; on exit
#   the script's children are stopped and that folder removed, and a later run removes the
#   folders of runs that died without their exit trap.
# - bench_binaries PACKAGE...: builds the packages' binaries (release) and sets $bin; with
#   BENCH_BIN set, uses the binaries in that folder as they are (the tests that kill a
#   script run it on the debug build).
# - pids and dirs: the servers a script started and their data directories; stop_servers
#   stops and removes them (between runs; the exit trap stops whatever is left).
# - port_of DATA_DIR FIELD: the address kvd wrote to its ports.json (client, resp) once it
#   serves.
# A script may define bench_on_exit, which runs first on exit.

bench_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC2034 # used by the scripts that source this
guard=(setpriv --pdeathsig KILL --)

scratch_root="$bench_root/target/bench-runs"
mkdir -p "$scratch_root"
for old in "$scratch_root"/*; do
  if [ -d "$old" ] && [ ! -e "/proc/${old##*/}" ]; then rm -rf "$old"; fi
done
scratch="$scratch_root/$$"
mkdir -p "$scratch"

scratch_dir() {
  mktemp -d -p "$scratch"
}

pids=()
dirs=()
stop_servers() {
  local pid dir
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for dir in "${dirs[@]}"; do rm -rf "$dir"; done
  pids=()
  dirs=()
}

port_of() {
  for _ in $(seq 1 300); do [ -f "$1/ports.json" ] && break; sleep 0.1; done
  python3 -c "import json,sys;print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1/ports.json" "$2"
}

bench_binaries() {
  if [ -n "${BENCH_BIN:-}" ]; then
    # shellcheck disable=SC2034 # used by the scripts that source this
    bin=$BENCH_BIN
    return
  fi
  local packages=() package
  for package in "$@"; do packages+=(-p "$package"); done
  (cd "$bench_root" && cargo build --release --quiet "${packages[@]}")
  # shellcheck disable=SC2034
  bin="$bench_root/target/release"
}

bench_exit() {
  local status=$?
  trap - EXIT
  if declare -F bench_on_exit >/dev/null; then bench_on_exit || true; fi
  pkill -TERM -P $$ 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$scratch"
  exit "$status"
}
trap bench_exit EXIT
# A signal ends the script through its exit trap.
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM
