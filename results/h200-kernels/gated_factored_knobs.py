"""The factored chunks and sub-chunks (``FACTOR_LIMIT``) against the pairwise form, and the launch
settings of the kernels they change (``_intra_kernel``, ``_bwd_chunk_kernel``), one variant a
process, as in ``gated_fwd_knobs.py`` (whose ``one`` this runs): the outputs and gradients against the
launchers' own settings in the same process (relative max error over the GPU tests' shapes;
``FACTOR_LIMIT = 0`` is the pairwise form, so its row is how far the two forms are apart), then
the kernel time of a forward and of a forward + backward at B=1, 32 heads, T=32K, F=Dv, with
LAWCAT-like decays ``logsigmoid(N(0, 1)) / 16`` (every chunk factored).

    python results/h200-kernels/gated_factored_knobs.py              # every variant
    python results/h200-kernels/gated_factored_knobs.py 128,64       # those of 128 and 64 features
    python results/h200-kernels/gated_factored_knobs.py '{"F": 128, "INTRA_WARPS": 8}'
"""

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gated_fwd_knobs import one  # noqa: E402

VARIANTS = [
    {"F": 128}, {"F": 128, "INTRA_BK": 64, "INTRA_WARPS": 2}, {"F": 128, "INTRA_BK": 64, "INTRA_WARPS": 8},
    {"F": 128, "CHUNK_BLOCKS": [32, 64, 4]}, {"F": 128, "CHUNK_BLOCKS": [64, 32, 4]},
    {"F": 128, "CHUNK_BLOCKS": [64, 128, 4]}, {"F": 128, "CHUNK_BLOCKS": [128, 64, 4]},
    {"F": 128, "CHUNK_BLOCKS": [64, 64, 2]},
    {"F": 64, "INTRA_BK": 64, "INTRA_WARPS": 2}, {"F": 256, "INTRA_BK": 64},
]

if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        one(json.loads(sys.argv[1]))
    else:
        todo = VARIANTS if len(sys.argv) == 1 else [v for v in VARIANTS if v["F"] in map(int, sys.argv[1].split(","))]
        for variant in todo:
            r = subprocess.run([sys.executable, __file__, json.dumps(variant)], capture_output=True, text=True, timeout=300)
            line = [x for x in r.stdout.splitlines() if x.startswith("{")]
            print(line[-1] if line else f"{variant}: failed (exit {r.returncode}) {r.stderr.strip()[-300:]}", flush=True)
