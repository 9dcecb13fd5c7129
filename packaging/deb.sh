#!/usr/bin/env bash
# Builds target/debian/dream_<version>_<arch>.deb with cargo-deb: the binary, its man page,
# shell completions, and the systemd examples. Installs cargo-deb first if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
cargo build --release --locked -p dream
mkdir -p target/assets
rm -rf target/assets/man && mkdir -p target/assets/man
./target/release/dream man --dir target/assets/man
./target/release/dream completions bash > target/assets/dream.bash
./target/release/dream completions zsh > target/assets/_dream
./target/release/dream completions fish > target/assets/dream.fish
cargo deb -p dream --no-build "$@"
ls -l target/debian/*.deb
