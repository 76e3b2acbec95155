#!/usr/bin/env bash
# Coverage-guided fuzzing of every decoder (cargo-fuzz: libFuzzer with AddressSanitizer) on the
# stable toolchain: RUSTC_BOOTSTRAP=1 lets stable rustc take the -Z flags cargo-fuzz passes.
#
#   scripts/fuzz.sh [SECONDS]            each target for SECONDS (default 30), starting from the
#                                        corpus kept in the repo (fuzz/corpus/T) and the seeds
#                                        (fuzz/seeds/T); new inputs go to target/fuzz/scratch
#   scripts/fuzz.sh --update [SECONDS]   the same, then merges the new inputs that add coverage
#                                        into fuzz/corpus/T (libFuzzer -merge=1), to commit
#
# A crash, a leak or a failed assertion exits non-zero and names the input that caused it
# (under target/fuzz/artifacts/T). CI (scripts/test.sh) runs it with 20 seconds per target.
set -euo pipefail
cd "$(dirname "$0")/.."

update=false
if [ "${1:-}" = "--update" ]; then
    update=true
    shift
fi
seconds="${1:-30}"
case "$seconds" in
    ''|*[!0-9]*) echo "fuzz.sh: SECONDS must be a whole number, not '$seconds'" >&2; exit 2 ;;
esac
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is not installed (scripts/install-deps.sh installs it)" >&2
    exit 1
fi

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="$PWD/target/fuzz/build"
scratch="$PWD/target/fuzz/scratch"
artifacts="$PWD/target/fuzz/artifacts"
targets=(frame invite certificate wire)

(cd fuzz && cargo fuzz build)
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "$scratch/$t" "$artifacts/$t"
    echo "fuzzing $t for ${seconds}s (corpus: $(ls "fuzz/corpus/$t" | wc -l) inputs)"
    # The first directory receives new inputs; the repo's corpus and the seeds are only read.
    log="$scratch/$t.log"
    status=0
    (cd fuzz && cargo fuzz run "$t" "$scratch/$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -seed=1 -print_final_stats=1 \
        -artifact_prefix="$artifacts/$t/") >"$log" 2>&1 || status=$?
    grep -E '^stat::(number_of_executed_units|new_units_added|peak_rss_mb)' "$log" | tr '\n' ' '
    echo
    if [ "$status" -ne 0 ] || [ -n "$(ls -A "$artifacts/$t")" ]; then
        tail -40 "$log" >&2
        echo "fuzz.sh: $t failed (exit $status); inputs: $(ls "$artifacts/$t")" >&2
        exit 1
    fi
    if $update; then
        (cd fuzz && cargo fuzz run "$t" "corpus/$t" "$scratch/$t" -- -merge=1 2>&1 | tail -1)
    fi
done
echo "fuzzing: no failures in ${#targets[@]} targets"
