python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
# Items 1-4 of the benchmarks at the seed shapes on one CUDA GPU (benchmarks/gpu.py; arguments pass through,
# e.g. --quick --device cpu). Results: benchmarks-gpu.md and .json in $OUT (else /tmp). Run from the repository root.
# The GPU machine has torch but not zarr or numcodecs: the first line installs the wheels in .whl/.
set -uo pipefail
# Progress bars, warnings and tracebacks go to a log beside the results; the table is the last thing printed.
mkdir -p "${OUT:-/tmp}"
log="${OUT:-/tmp}/benchmarks-gpu-stderr.log"
if ! python3 benchmarks/gpu.py "$@" 2>"$log"; then
  echo "gpu.py failed; the end of its stderr ($log):"
  tail -n 60 "$log"
  exit 1
fi
