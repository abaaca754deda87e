"""Several processes on 127.0.0.1 stand in for several hosts (jax.distributed + gloo)."""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT

WORKER = ROOT / "tests" / "mp_worker.py"
pytestmark = pytest.mark.timeout(600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_two_processes_match_one_process(tmp_path):
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, str(WORKER), "--devices", "2", "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(i), "--out", str(tmp_path / f"two{i}.npz")],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    single = subprocess.run([sys.executable, str(WORKER), "--devices", "4", "--out", str(tmp_path / "one.npz")],
                            env=_env(), capture_output=True, text=True, timeout=500)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    for p in procs:
        out, _ = p.communicate(timeout=500)
        assert p.returncode == 0, out[-3000:]
    two, one = np.load(tmp_path / "two0.npz"), np.load(tmp_path / "one.npz")
    print("2 processes x 2 devices:", two["losses"])
    print("1 process  x 4 devices:", one["losses"])
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    assert set(two.files) == set(one.files)
    for name in one.files:
        if name != "losses":
            np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-7, err_msg=name)
