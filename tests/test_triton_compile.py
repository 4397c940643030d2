"""The Triton kernels compile for sm_90 (H100/H200) on this machine, without a GPU.

The interpreter tests (test_ops_attention.py, test_ops_loss.py) check what the kernels compute; a
kernel the interpreter runs can still be rejected by the GPU compiler (types, layouts, shared
memory). tests/triton_sm90.py lowers every kernel variant the launchers use to a cubin with Triton's
compiler and the ptxas in the triton wheel; it runs in a subprocess because this test session has
TRITON_INTERPRET=1, which replaces the kernels by their interpreted form.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("triton_sm90.py")


def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    summary = re.search(r"compiled (\d+) of (\d+) kernel variants for sm_90", out)
    assert summary and summary.group(1) == summary.group(2) and int(summary.group(2)) >= 25, out[-2000:]
    assert any(p.suffix == ".cubin" for p in (tmp_path / "triton-cache").rglob("*"))  # really compiled
