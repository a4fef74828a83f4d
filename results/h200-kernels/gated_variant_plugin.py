"""A pytest plugin that runs the tests under other settings of ``linearize.kernels.gated.chunk``:
the JSON object in ``GATED_VARIANT`` sets its module attributes (lists become tuples) before any
test runs, in every xdist worker too (they inherit the variable and the plugin).

    GATED_VARIANT='{"CHUNK_BACKWARD": false}' PYTHONPATH=results/h200-kernels \\
        python -m pytest tests/kernels/test_triton_gated.py -p gated_variant_plugin
"""

import json
import os


def pytest_configure(config):
    variant = os.environ.get("GATED_VARIANT")
    if variant:
        import linearize.kernels.gated.chunk as ch

        for name, value in json.loads(variant).items():
            if not hasattr(ch, name):
                raise AttributeError(f"GATED_VARIANT: linearize.kernels.gated.chunk has no {name}")
            setattr(ch, name, tuple(value) if isinstance(value, list) else value)
