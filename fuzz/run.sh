#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each; the first
# argument changes it), starting from and adding to the corpus kept in
# fuzz/corpus/<target>. A crash fails the run and leaves its input in
# fuzz/artifacts/<target>/ (rerun it with `cargo fuzz run <target> <file>`).
#
# cargo-fuzz is installed when missing. The targets build with libFuzzer's
# coverage instrumentation but without a sanitizer (`-s none`): that needs
# no nightly compiler, and Servitor forbids unsafe code, which is what
# AddressSanitizer would watch.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
CARGO_FUZZ_VERSION=0.13.1
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install --locked --quiet cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
export CARGO_TARGET_DIR="${SERVITOR_FUZZ_TARGET:-${XDG_CACHE_HOME:-$HOME/.cache}/servitor-fuzz-target}"
targets=$(cargo fuzz list)
cargo fuzz build -s none --debug-assertions
mkdir -p logs
for target in $targets; do
  mkdir -p "corpus/$target"
  echo "fuzzing $target for ${seconds}s"
  status=0
  cargo fuzz run -s none --debug-assertions "$target" "corpus/$target" -- \
    -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 -timeout=10 \
    -print_final_stats=1 >"logs/$target.log" 2>&1 || status=$?
  grep -E "^stat::(number_of_executed_units|new_units_added|peak_rss_mb)" "logs/$target.log" | tr '\n' ' ' || true
  echo
  if [ "$status" -ne 0 ]; then
    tail -n 40 "logs/$target.log" >&2
    echo "error: fuzz target $target failed (status $status); its input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
done
