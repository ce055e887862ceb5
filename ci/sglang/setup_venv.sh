#!/usr/bin/env bash
# Build the optional SGLang test-tier venv:  ci/sglang/setup_venv.sh VENV_DIR VERSION [EXTRA_VERSION...]
#
# VERSION is installed into the venv itself (e.g. 0.5.23, the registry-plugin seam).  Each
# EXTRA_VERSION (e.g. 0.5.20, the LMCache-connector seam) goes into VENV_DIR/sglang-EXTRA_VERSION
# with --target; put that directory first on PYTHONPATH to run against that release.  The extra
# releases share the venv's torch and small dependencies, which saves a second ~1.5 GB venv.
#
# Verified with CPython 3.11 on x86_64 (the SGLang wheels used are cp311 manylinux_2_34, so glibc >= 2.34);
# PYTHON picks the interpreter. Takes ~3 min and ~2.6 GB (triton 1.0 GB, torch 0.75 GB, SGLang 0.22 GB,
# the 0.5.20 overlay 0.17 GB).
#
# CPU only: torch is installed first from the pinned version and then used as a pip constraint,
# and SGLang is installed with --no-deps, so no CUDA wheel is ever pulled.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 VENV_DIR VERSION [EXTRA_VERSION...]" >&2
    exit 2
fi
venv_dir=$1
shift
main_version=$1
shift

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$here/../.." && pwd)
python=${PYTHON:-python3}
torch_version=${LMC_TORCH_VERSION:-2.13.0}
triton_version=${LMC_TRITON_VERSION:-3.9.0}

"$python" -m venv "$venv_dir"
pip=("$venv_dir/bin/python" -m pip install --quiet --disable-pip-version-check)

constraints="$venv_dir/torch-constraint.txt"
printf 'torch==%s\ntriton==%s\n' "$torch_version" "$triton_version" > "$constraints"

"${pip[@]}" "torch==$torch_version" "triton==$triton_version" numpy
# Fails loudly if a CUDA build slipped in through a local wheel cache.
"$venv_dir/bin/python" - <<PY
import torch
assert torch.version.cuda is None, f"expected a CPU torch, got CUDA {torch.version.cuda}"
PY
"${pip[@]}" -c "$constraints" -r "$here/requirements.txt"
"${pip[@]}" -c "$constraints" -e "$repo_root"
"${pip[@]}" --no-deps "sglang==$main_version"

for extra in "$@"; do
    "${pip[@]}" --no-deps --target "$venv_dir/sglang-$extra" "sglang==$extra"
done
