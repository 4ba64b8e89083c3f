python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
# Items 1-4 of the benchmarks at the seed shapes on one CUDA GPU (tests/benchmarks/gpu.py; arguments pass through,
# e.g. --quick --device cpu). Results: benchmarks-gpu.md and .json in $OUT (else /tmp). Run from the repository root.
# The GPU machine has torch but not zarr, numcodecs or crc32c: the first line installs the wheels in .whl/.
set -uo pipefail
# cache.reader and cache.encoder import the crc32c package; .whl/ carries google_crc32c (the same CRC-32C, and
# zarr's own dependency), so without crc32c a one-function stand-in maps the one onto the other.
if ! python3 -c "import crc32c" 2>/dev/null; then
  cat > /tmp/site/crc32c.py <<'PY'
"""crc32c.crc32c over google_crc32c, for machines without the crc32c package (written by gpu.sh)."""
import google_crc32c
import numpy as np


def crc32c(data, value=0):
    view = np.frombuffer(data, dtype=np.uint8)  # no copy; google_crc32c takes read-only buffers only
    view.flags.writeable = False
    return google_crc32c.extend(value, view)
PY
fi
# Progress bars, warnings and tracebacks go to a log beside the results; the table is the last thing printed.
mkdir -p "${OUT:-/tmp}"
log="${OUT:-/tmp}/benchmarks-gpu-stderr.log"
if ! python3 tests/benchmarks/gpu.py "$@" 2>"$log"; then
  echo "gpu.py failed; the end of its stderr ($log):"
  tail -n 60 "$log"
  exit 1
fi
