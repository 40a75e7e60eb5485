#!/usr/bin/env bash
# Coverage-guided fuzzing of Ferry's decoders with libFuzzer, on the stable toolchain.
#
# Builds the targets of fuzz/ (fuzz/fuzz_targets/<name>.rs, one [[bin]] each) once, with
# sanitizer-coverage instrumentation, into target/fuzz (release, --locked, -j1), then runs
# each with libFuzzer for N executions. Per target: corpus in fuzz/corpus/<target>/ (kept
# between runs, seeded with a few valid encodings when new), crash artifacts in
# fuzz/artifacts/<target>/, full libFuzzer log in target/fuzz/logs/<target>.log.
# Prints one line per target, then a total; exits non-zero when a target crashed (panic,
# failed assert, timeout, allocation over -malloc_limit_mb, RSS over -rss_limit_mb), failed
# to build, or ran without coverage instrumentation.
#
# Usage: scripts/fuzz.sh [--runs N] [--jobs J] [--list] [TARGET...]
#   --runs N   executions per target (libFuzzer -runs=N; default 10000000)
#   --jobs J   targets fuzzed at once (default 1; each target is one process, one core)
#   --list     print the target names and exit
#   TARGET...  fuzz only these (default: all)
# Reproduce a crash: target/fuzz/<host triple>/release/<target> <artifact> (the script
# prints the exact command).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FUZZ=$ROOT/fuzz
export CARGO_TARGET_DIR=$ROOT/target/fuzz

# What cargo-fuzz passes for libFuzzer coverage, minus the nightly-only -Zsanitizer:
# inline 8-bit edge counters + PC table (cov/ft), comparison tracing (CMP/value hints),
# --cfg fuzzing, and debug assertions and overflow checks kept on in release.
FUZZ_RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# Limits for every run: a single allocation over 256 MiB or an RSS over 2 GiB is a crash
# (the allocation check works on stable through the hook in fuzz/src/lib.rs), and so is
# one input taking over 10 s.
LIMITS=(-rss_limit_mb=2048 -malloc_limit_mb=256 -timeout=10)

runs=10000000
jobs=1
list=0
want=()
while (($#)); do
    case $1 in
        --runs) runs=${2:?--runs needs a number}; shift 2 ;;
        --runs=*) runs=${1#*=}; shift ;;
        --jobs) jobs=${2:?--jobs needs a number}; shift 2 ;;
        --jobs=*) jobs=${1#*=}; shift ;;
        --list) list=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "fuzz: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) want+=("$1"); shift ;;
    esac
done
[[ $runs =~ ^[0-9]+$ ]] || { echo "fuzz: --runs takes a number, not '$runs'" >&2; exit 2; }
[[ $jobs =~ ^[1-9][0-9]*$ ]] || { echo "fuzz: --jobs takes a number >= 1, not '$jobs'" >&2; exit 2; }

all=()
for f in "$FUZZ"/fuzz_targets/*.rs; do
    [[ -e $f ]] && all+=("$(basename "$f" .rs)")
done
if ((list)); then
    printf '%s\n' "${all[@]}"
    exit 0
fi
if ((${#want[@]})); then
    for t in "${want[@]}"; do
        [[ -f $FUZZ/fuzz_targets/$t.rs ]] || {
            echo "fuzz: no target '$t' (targets: ${all[*]})" >&2
            exit 2
        }
    done
    targets=("${want[@]}")
else
    targets=("${all[@]}")
fi
((${#targets[@]})) || { echo "fuzz: no targets in $FUZZ/fuzz_targets" >&2; exit 2; }

# An explicit --target keeps RUSTFLAGS off build scripts and proc macros (instrumented,
# they would not link: the __sanitizer_cov_* symbols live in libFuzzer), as cargo-fuzz does.
# It also puts the binaries under target/fuzz/<host>/release.
host=$(rustc -vV | sed -n 's/^host: //p')
bindir=$CARGO_TARGET_DIR/$host/release
logdir=$CARGO_TARGET_DIR/logs
mkdir -p "$logdir"

build() { # build TARGET... -> cargo's status
    local args=() rc=0
    for t in "$@"; do args+=(--bin "$t"); done
    (cd "$FUZZ" && env -u CARGO_ENCODED_RUSTFLAGS RUSTFLAGS="$FUZZ_RUSTFLAGS" \
        cargo build --release --locked --keep-going -j1 --target "$host" "${args[@]}") \
        2>&1 | tee "$logdir/build.log" || rc=$?
    if ((rc)) && grep -qE 'lock file .* needs to be updated|because --locked was passed' "$logdir/build.log"; then
        echo "fuzz: fuzz/Cargo.lock no longer matches the crates' dependencies:" \
            "run (cd fuzz && cargo update --workspace) and commit fuzz/Cargo.lock" >&2
        return 3
    fi
    return "$rc"
}

failed=() # targets that failed to build or run
ok=()
echo "fuzz: building ${targets[*]} (target/fuzz/$host/release)"
# --keep-going: a target that does not compile does not stop the others; a crate they
# share that does not compile fails them all.
brc=0
build "${targets[@]}" || brc=$?
if ((brc == 0)); then
    ok=("${targets[@]}")
else
    # shellcheck disable=SC2016 # the backquotes are cargo's, not an expansion
    broken=$(sed -nE 's/.*could not compile `ferry-fuzz` \(bin "([^"]+)"\).*/\1/p' "$logdir/build.log")
    # shellcheck disable=SC2016
    if ((brc != 3)) && [[ -n $broken ]] &&
        ! grep 'could not compile' "$logdir/build.log" | grep -qv 'could not compile `ferry-fuzz` (bin '; then
        for t in "${targets[@]}"; do
            if grep -qx "$t" <<<"$broken"; then failed+=("$t"); else ok+=("$t"); fi
        done
    else
        failed=("${targets[@]}")
    fi
    for t in "${failed[@]}"; do echo "fuzz $t: build failed"; done
fi

# A few valid encodings to start a new corpus from (hex; libFuzzer finds the rest, and
# the comparison tracing gets it past magics and tags quickly even without them).
seed() { # seed TARGET NAME HEX
    local dir=$FUZZ/corpus/$1
    # shellcheck disable=SC2001 # a regex replace, not a fixed string
    printf '%b' "$(sed 's/../\\x&/g' <<<"$3")" >"$dir/seed-$2"
}
seed_corpus() { # seed_corpus TARGET: only into an empty corpus
    local t=$1 dir=$FUZZ/corpus/$1
    [[ -z $(ls -A "$dir") ]] || return 0
    # Binary seeds kept in the repository (fuzz/seeds/<target>/, e.g. a vm_state blob saved
    # from a real KVM vCPU by kvm-glue's tests with FERRY_DUMP_STATE_SEED set).
    if [[ -d $FUZZ/seeds/$t ]]; then
        cp "$FUZZ/seeds/$t"/* "$dir"/
    fi
    case $t in
        data_header) # magic "FDAT", kind, reserved 0, round, region, first page, count
            seed "$t" pages 4644415401000000030000000100000010000000000000000001000000000000
            seed "$t" zero 4644415402000000010000000000000000100000000000000400000000000000
            seed "$t" round-end 4644415403000000020000000100000000000000000000002a00000000000000
            ;;
        dirty_bitmap) # npages, then LE u64 words
            seed "$t" 130-pages 8200000000000000ffffffffffffffff0f00000000000080ffffffffffffffff
            seed "$t" 64-pages 4000000000000000aaaaaaaaaaaaaaaa
            ;;
        frame | unix_frame) # len u32, tag u16, magic ("FV": VMM protocol), payload
            seed "$t" vmm-ok 0000000006004656
            seed "$t" vmm-hello 02000000010046560100
            seed "$t" vmm-welcome 02000000020046560100
            ;;
        record)
            seed "$t" decision 0066657272792d7265636f726420310a6b696e643d6465636973696f6e0a73746174653d636f6d6d69747465640a73657373696f6e3d30303131323233333434353536363737383839396161626263636464656566660a746f3d31302e302e302e323a373738300a
            seed "$t" incoming 0166657272792d7265636f726420310a6b696e643d696e636f6d696e670a73746174653d73746172742d6661696c65640a73657373696f6e3d30303131323233333434353536363737383839396161626263636464656566660a64657461696c3d6e6f0a6d61795f686176655f72756e3d66616c73650a
            seed "$t" running 0166657272792d7265636f726420310a6b696e643d696e636f6d696e670a73746174653d72756e6e696e670a73657373696f6e3d30303131323233333434353536363737383839396161626263636464656566660a64657461696c3d6f6b0a
            seed "$t" release 0266657272792d7265636f726420310a6b696e643d72656c656173650a73657373696f6e3d30303131323233333434353536363737383839396161626263636464656566660a766d3d766d310a746f3d31302e302e302e323a373738300a
            ;;
        rdma_offer)
            seed "$t" offer 004652524f01000000001000000100000001000000010000000100000000000100000000000000000000000000000000000010000000000000010000000000010000000000001000000000000007000000
            seed "$t" answer 0146525241010000000100000001000000010000000000010000000000000000000000000000000000
            ;;
        vm_state)
            seed "$t" cpu-profile 0146455252594350550100000041757468656e746963414d440100000001000000000000000334120000
            ;;
        message)
            seed "$t" vmm-register 00040003000000766d31010000000000000000000000000010000000000000000000000000000000000000
            seed "$t" cli-migrate 01050003000000766d310d00000031302e302e302e323a3737383004002c0100001e00000060ea00000000000002010000000001
            seed "$t" peer-offer 02080003000000766d3100100000010000000000000000000000000010000000000000000000000000000400020000000000000000000000000000000000000000
            seed "$t" peer-rounddone 020f00010000000a0000000000000000a0000000000000010000000000000005000000000000000100000000000000
            ;;
    esac
}

# run_one TARGET: fuzz it, print its line, leave "<crashes> <failed>" in $logdir/TARGET.res
run_one() {
    local t=$1
    local corpus=$FUZZ/corpus/$t art=$FUZZ/artifacts/$t log=$logdir/$t.log
    mkdir -p "$corpus" "$art"
    seed_corpus "$t"
    local before start rc=0
    before=$(find "$art" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort)
    start=$(date +%s.%N)
    RUST_BACKTRACE=${RUST_BACKTRACE:-1} "$bindir/$t" -runs="$runs" "${LIMITS[@]}" \
        -artifact_prefix="$art/" -print_final_stats=1 "$corpus" >"$log" 2>&1 || rc=$?
    local wall
    wall=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')

    # Last stats line: "#N  DONE   cov: C ft: F corp: K/Sb ..."; final "Done N runs in S
    # second(s)" (absent after a crash: then the last "#N" counts). Seconds are the wall
    # time of the libFuzzer process to 0.1 s (the Done line has whole seconds only).
    local stats execs secs=$wall cov ft corp
    stats=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
    execs=$(sed -nE 's/^Done ([0-9]+) runs in [0-9]+ second.*/\1/p' "$log" | tail -n 1)
    [[ -n $execs ]] || execs=$(sed -nE 's/^#([0-9]+).*/\1/p' <<<"$stats")
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$stats")
    ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$stats")
    corp=$(sed -nE 's/.* corp: ([0-9]+).*/\1/p' <<<"$stats")

    local new=() f
    while IFS= read -r f; do
        [[ -n $f ]] && new+=("$art/$f")
    done < <(comm -13 <(printf '%s\n' "$before") <(find "$art" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort))

    echo "fuzz $t: ${execs:-0} execs in ${secs:-0} s, cov ${cov:-0}, ft ${ft:-0}, corpus ${corp:-0}, crashes ${#new[@]}"
    local bad=0
    if ((${#new[@]})); then
        bad=1
        # What went wrong: libFuzzer's verdict, and a panic's location and message.
        grep -m1 -E '^==[0-9]+== ERROR: libFuzzer' "$log" | sed "s/^/fuzz $t:   /" || true
        awk '/panicked at/ { p = 1; n = 0 } p && /^(stack backtrace|note: )/ { exit }
             p { print; if (++n == 6) exit }' "$log" | sed "s/^/fuzz $t:   /"
        for f in "${new[@]}"; do
            echo "fuzz $t:   artifact ${f#"$ROOT"/}"
            echo "fuzz $t:   reproduce: ${bindir#"$ROOT"/}/$t ${LIMITS[*]} ${f#"$ROOT"/}"
        done
        echo "fuzz $t:   log: ${log#"$ROOT"/}"
    elif ((rc != 0)); then
        bad=1
        echo "fuzz $t:   libFuzzer exited with status $rc and no artifact; see ${log#"$ROOT"/}:"
        tail -n 5 "$log" | sed "s/^/fuzz $t:   /"
    elif [[ -z $cov ]] || grep -q 'no interesting inputs were found' "$log"; then
        bad=1
        echo "fuzz $t:   no coverage feedback (binary not instrumented?); see ${log#"$ROOT"/}"
    fi
    echo "${#new[@]} $bad" >"$logdir/$t.res"
}

pids=()
cleanup() { if ((${#pids[@]})); then kill "${pids[@]}" 2>/dev/null || true; fi; }
trap cleanup EXIT
trap 'exit 130' INT TERM

for t in "${ok[@]}"; do
    rm -f "$logdir/$t.res"
    if ((jobs == 1)); then
        run_one "$t"
    else
        while (($(jobs -rp | wc -l) >= jobs)); do wait -n || true; done
        run_one "$t" &
        pids+=($!)
    fi
done
wait || true
pids=()

crashes=0
for t in "${ok[@]}"; do
    if [[ -f $logdir/$t.res ]]; then
        read -r c b <"$logdir/$t.res"
        crashes=$((crashes + c))
        if ((b)) && ((c == 0)); then failed+=("$t"); fi
    else
        failed+=("$t")
    fi
done
((${#failed[@]} == 0)) || echo "fuzz: failed (build, run or no coverage): ${failed[*]}"
echo "fuzz: ${#targets[@]} targets, $crashes crashes"
((crashes == 0 && ${#failed[@]} == 0))
