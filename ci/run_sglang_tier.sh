#!/usr/bin/env bash
# The optional SGLang test tier in one command:  ci/run_sglang_tier.sh [pytest args...]
#
# Builds (or reuses) a venv with SGLang 0.5.23 and an overlay with 0.5.20 under
# $LMC_SGLANG_VENV_CACHE (default: a directory in $TMPDIR that survives between runs),
# then runs tests/sglang against each release. Rebuilds when the pins change.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${LMC_SGLANG_VENV_CACHE:-${TMPDIR:-/tmp}/lmc-sglang-tier}
main_version=0.5.23
compat_version=0.5.20

# The venv is keyed by everything that decides its contents (the editable install records the repo path
# and installs the dependencies pyproject.toml names).
key=$( (cat "$repo/ci/sglang/requirements.txt" "$repo/ci/sglang/setup_venv.sh" "$repo/pyproject.toml"; echo "$repo") | sha256sum | cut -c1-12)
venv="$cache/venv-$key"
if [[ ! -f "$venv/.complete" ]]; then
    rm -rf "$venv"
    mkdir -p "$cache"
    start=$(date +%s)
    "$repo/ci/sglang/setup_venv.sh" "$venv" "$main_version" "$compat_version"
    touch "$venv/.complete"
    echo "sglang tier: venv built in $(( $(date +%s) - start ))s, $(du -sh "$venv" | cut -f1) at $venv"
else
    # The repo may have moved on since the venv was built; the editable install follows it.
    echo "sglang tier: reusing $venv"
fi

cd "$repo"
echo "sglang tier: SGLang $main_version (registry plugin)"
"$venv/bin/python" -m pytest tests/sglang -m sglang -p no:cacheprovider "$@"
echo "sglang tier: SGLang $compat_version (LMCache connector seam)"
PYTHONPATH="$venv/sglang-$compat_version${PYTHONPATH:+:$PYTHONPATH}" \
    "$venv/bin/python" -m pytest tests/sglang -m sglang -p no:cacheprovider "$@"
