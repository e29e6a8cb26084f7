#!/usr/bin/env bash
# Builds the fuzz targets of fuzz/ and runs each for SECONDS (default 10) over its committed
# corpus, without cargo-fuzz: the flags are the ones `cargo fuzz build` passes (sanitizer
# coverage for libFuzzer, `--cfg fuzzing`, AddressSanitizer, debug assertions). Needs the nightly
# toolchain (rustup) and a C++ compiler (libfuzzer-sys builds libFuzzer); without nightly it
# prints SKIPPED and exits 0. New inputs found go to a scratch copy of the corpus, not the repo;
# a crash leaves its input in fuzz/artifacts/TARGET/ and fails the script.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
shift || true

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "SKIPPED: no nightly toolchain"
  exit 0
fi
if ! command -v c++ >/dev/null; then
  echo "fuzz.sh: no C++ compiler (c++); run scripts/install-test-deps.sh" >&2
  exit 1
fi

triple=$(rustup run nightly rustc -vV | awk '/^host:/{print $2}')
# An explicit --target keeps build scripts and proc macros uninstrumented, as cargo-fuzz does.
export RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
-Cllvm-args=-sanitizer-coverage-stack-depth \
-Cllvm-args=-simplifycfg-branch-fold-threshold=0 \
--cfg fuzzing -Zsanitizer=address -Cdebug-assertions -Ccodegen-units=1"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0}
target_dir=${CARGO_TARGET_DIR:-$PWD/fuzz/target}
cargo +nightly build --locked --release --manifest-path fuzz/Cargo.toml --target "$triple" \
  --target-dir "$target_dir" --bins
bin_dir=$target_dir/$triple/release

if [ $# -eq 0 ]; then
  set -- $(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^vmlock-fuzz$')
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in "$@"; do
  mkdir -p "fuzz/artifacts/$t" "$scratch/$t"
  cp -r "fuzz/corpus/$t/." "$scratch/$t/" 2>/dev/null || true
  echo "== fuzz $t for ${seconds}s"
  if ! "$bin_dir/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" "$scratch/$t" \
    >"$scratch/$t.log" 2>&1; then
    tail -n 60 "$scratch/$t.log" >&2
    failed+=("$t")
  else
    grep -E '^(stat::number_of_executed_units|Done )' "$scratch/$t.log" || true
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz.sh: ${#@} targets ran ${seconds}s each, no crash"
