#!/usr/bin/env bash
# Builds the fuzz targets of fuzz/ and runs each for SECONDS (default 10) over its committed
# corpus, without cargo-fuzz (docs/RELIABILITY.md, "Fuzzing"). One `cargo build` makes every
# target, with the flags `cargo fuzz build --sanitizer none` passes (sanitizer coverage for
# libFuzzer, `--cfg fuzzing`) and debug assertions (so arithmetic overflow is a crash), on the
# machine's one toolchain (stable): scripts/test.sh runs it this way in CI.
#
# FUZZ_SANITIZER=address adds AddressSanitizer, as `cargo fuzz build` does by default; that needs
# the nightly toolchain (rustup), and without it the script prints SKIPPED and exits 0.
#
# libfuzzer-sys builds libFuzzer with a C++ compiler (g++: scripts/install-test-deps.sh). New
# inputs found go to a scratch copy of the corpus, not the repo; a crash leaves its input in
# fuzz/artifacts/TARGET/ and fails the script.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
shift || true

sanitizer=${FUZZ_SANITIZER:-none}
toolchain=()
flags="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
-Cllvm-args=-sanitizer-coverage-stack-depth \
-Cllvm-args=-simplifycfg-branch-fold-threshold=0 \
--cfg fuzzing -Cdebug-assertions"
case $sanitizer in
  none) ;;
  address)
    if ! rustup run nightly rustc --version >/dev/null 2>&1; then
      echo "SKIPPED: FUZZ_SANITIZER=address needs the nightly toolchain, which is not installed"
      exit 0
    fi
    toolchain=(+nightly)
    flags="$flags -Zsanitizer=address"
    export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0}
    ;;
  *)
    echo "fuzz.sh: FUZZ_SANITIZER is none or address, not $sanitizer" >&2
    exit 2
    ;;
esac
if ! command -v c++ >/dev/null; then
  echo "fuzz.sh: no C++ compiler (c++); run scripts/install-test-deps.sh" >&2
  exit 1
fi

triple=$(rustc "${toolchain[@]}" -vV | awk '/^host:/{print $2}')
export RUSTFLAGS=$flags
# libFuzzer's own C++ (libfuzzer-sys's build script, on one core): -O1 without debug information
# compiles in half the time of cc's release default (-O3 -g), and its speed is not what is fuzzed.
export "CXXFLAGS_${triple//-/_}=-O1 -g0"
# Each sanitizer has its own target directory, so switching does not rebuild the other.
target_dir=${CARGO_TARGET_DIR:-$PWD/fuzz/target}/$sanitizer
start=$SECONDS
# An explicit --target keeps build scripts and proc macros uninstrumented, as cargo-fuzz does.
cargo "${toolchain[@]}" build --locked --release --manifest-path fuzz/Cargo.toml \
  --target "$triple" --target-dir "$target_dir" --bins
echo "fuzz.sh: built in $((SECONDS - start))s (sanitizer: $sanitizer)"
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
# The plain closing line CI reads: each target is one test.
echo "fuzz: $(($# - ${#failed[@]})) passed, ${#failed[@]} failed"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
