#!/usr/bin/env bash
# Builds the fuzz targets with the nightly toolchain and runs each for a while.
# Uses `cargo fuzz` when it is installed; otherwise the same build by hand (the flags cargo-fuzz
# passes, without a sanitizer: the crate forbids unsafe code), so no extra tool is needed.
#   fuzz/run.sh [SECONDS_PER_TARGET]   (default 60)
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
targets=(job_parser genesys_answers)
mkdir -p corpus/job_parser corpus/genesys_answers
# Seeds: the documented example jobs (first byte 0 = no message_id, as the target reads it).
for example in ../docs/examples/*.job.json; do
  { printf '\0'; cat "$example"; } > "corpus/job_parser/$(basename "$example")"
done
if cargo +nightly fuzz --version >/dev/null 2>&1; then
  for target in "${targets[@]}"; do
    cargo +nightly fuzz run "$target" "corpus/$target" -- -max_total_time="$seconds"
  done
  exit 0
fi
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
cargo +nightly build --release --bins --target x86_64-unknown-linux-gnu
mkdir -p artifacts
# libFuzzer reports every new input it keeps (thousands of lines): its output goes to a log beside
# the artifacts, and only its summary (or, on a finding, the end of the log) is printed.
for target in "${targets[@]}"; do
  log="artifacts/$target.log"
  if ! "target/x86_64-unknown-linux-gnu/release/$target" "corpus/$target" \
    -artifact_prefix="artifacts/" -max_total_time="$seconds" -rss_limit_mb=2048 >"$log" 2>&1; then
    echo "fuzz target $target FAILED (fuzz/$log):" >&2
    tail -n 60 "$log" >&2
    exit 1
  fi
  echo "fuzz target $target: $(grep -E '^Done ' "$log" | tail -n 1), $(grep -oE 'cov: [0-9]+' "$log" | tail -n 1), no crash (log: fuzz/$log)"
done
