"""Running code this repository compiles under AddressSanitizer, in a subprocess.

The interpreter is not instrumented, so the ASan runtime must be loaded first (LD_PRELOAD), and
libstdc++ with it, or ASan's __cxa_throw interceptor has nothing to forward C++ exceptions to.
Reports go to files (log_path), since pytest captures the subprocess's stderr of the failing test.
These checks use GCC by name (its ASan runtime, and the ThreadSanitizer call ABI that the CUDA
emulator's traffic counters implement), whatever $CXX says; without g++ they are skipped.
"""
import os
import shutil
import subprocess
from pathlib import Path


def compiler() -> str | None:
    """g++, or None where it is not installed."""
    return shutil.which("g++")


def asan_env(log_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for a Python subprocess with the ASan runtime preloaded, reports under log_dir."""
    cxx = compiler()
    assert cxx is not None, "no g++"
    preload = [subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
               for lib in ("libasan.so", "libstdc++.so")]
    assert all(Path(p).is_file() for p in preload), f"no ASan runtime for {cxx}: {preload}"
    return {**os.environ, "LD_PRELOAD": " ".join(preload), "CXX": cxx,  # builds in the subprocess: the same GCC
            "ASAN_OPTIONS": f"detect_leaks=0:log_path={log_dir / 'asan'}", **extra}


def asan_reports(log_dir: Path, lines: int = 12) -> str:
    """The error line and the first frames of each report written under log_dir."""
    text = "\n".join(p.read_text() for p in sorted(log_dir.glob("asan*")))
    return "\n".join(text[text.find("ERROR: AddressSanitizer"):].splitlines()[:lines]) if text else ""
