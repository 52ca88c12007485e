#!/usr/bin/env bash
# Build the fuzz target and run it for a while (default 30 s; the long run and its figures
# are in docs/TESTING.md). Installs cargo-fuzz when missing. Stable Rust only here:
# RUSTC_BOOTSTRAP=1 lets it take the -Z flags cargo-fuzz passes (sanitizer, coverage).
#
#   scripts/fuzz.sh            # 30 s
#   scripts/fuzz.sh 600        # 10 minutes, growing fuzz/corpus/decode_request
#
# New inputs go to fuzz/corpus/decode_request (git-ignored); the committed, minimized
# corpus is fuzz/seeds/decode_request. A crash is saved in fuzz/artifacts/ and fails this.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
seconds="${1:-30}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
mkdir -p corpus/decode_request
cargo fuzz run decode_request corpus/decode_request seeds/decode_request -- \
	-dict=decode_request.dict -max_total_time="$seconds" -timeout=5 -print_final_stats=1
