"""The README's embedding example runs as shipped."""
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "embed_phase_step.py"


def test_embed_example_runs():
    out = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "4"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "mmsa_attention: o_g (2, 37, 4, 32), o_d (2, 50, 4, 32)" in out.stdout
    assert "step   0 gen: " in out.stdout and "step   1 det: " in out.stdout
    assert "p_fake of 4 real images" in out.stdout
