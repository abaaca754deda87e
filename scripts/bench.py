#!/usr/bin/env python
"""Side-by-side training-step benchmark of JAX and the PyTorch reference (see jaxllm/bench.py).

    python scripts/bench.py --quick                 # small preset, under 3 minutes on 2 CPU cores
    python scripts/bench.py --json bench.json       # small and seed-973m (micro-batch 4 x 256)
"""

import os
import sys

# This file's checkout (found through any symbolic link) goes ahead of an installed jaxllm: after a
# `pip install .` (not -e) the installed copy ran instead of the code beside this file. Where no
# checkout holds this file (convert/ as pip installs it, a script copied alone), the installed packages serve.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if os.path.isfile(os.path.join(_CHECKOUT, "pyproject.toml")) and os.path.isdir(os.path.join(_CHECKOUT, "jaxllm")):
    sys.path.insert(0, _CHECKOUT)
    if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != _CHECKOUT:  # the same for the workers
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_CHECKOUT, os.environ.get("PYTHONPATH")]))

from jaxllm.bench import main  # noqa: E402

if __name__ == "__main__":
    from jaxllm.hostmem import reexec_with_huge_pages

    reexec_with_huge_pages(__file__)  # big per-step buffers in huge pages (jaxllm/hostmem.py)
    sys.exit(main())
