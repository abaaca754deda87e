#!/usr/bin/env python
"""Side-by-side training-step benchmark of JAX and the PyTorch reference (see jaxllm/bench.py).

    python scripts/bench.py --quick                 # small preset, under 3 minutes on 2 CPU cores
    python scripts/bench.py --json bench.json       # small and seed-973m (micro-batch 4 x 256)
"""

import os
import sys

try:
    import jaxllm  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [sys.path[0], os.environ.get("PYTHONPATH")]))

from jaxllm.bench import main  # noqa: E402

if __name__ == "__main__":
    from jaxllm.hostmem import reexec_with_huge_pages

    reexec_with_huge_pages(__file__)  # big per-step buffers in huge pages (jaxllm/hostmem.py)
    sys.exit(main())
