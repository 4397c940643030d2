"""A run stopped by SIGTERM saves and exits cleanly; a run killed with SIGKILL (even while saving)
resumes from its last complete checkpoint."""
import os
import signal
import subprocess
import sys
import time

from unigendet.train import list_checkpoints


def start(overrides, *extra):
    cmd = [sys.executable, "-m", "unigendet.cli", "train", "--config", "tiny_cpu", *overrides, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for_checkpoint(run, proc, newer_than=-1, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        ckpts = list_checkpoints(run)
        if ckpts and int(ckpts[-1].name.split("_")[1]) > newer_than:
            return int(ckpts[-1].name.split("_")[1])
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def test_sigterm_saves_and_exits_then_sigkill_and_resume(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides + ["--train.steps=100000", "--train.save_every=5", "--train.keep_last=2"]
    proc = start(overrides)
    wait_for_checkpoint(run, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out  # EXIT_STOPPED (EX_TEMPFAIL): saved, unfinished, requeue with --resume
    assert "SIGTERM: stopped cleanly after step" in out
    stopped = int(out.split("stopped cleanly after step ")[1].split(";")[0])
    assert int(list_checkpoints(run)[-1].name.split("_")[1]) == stopped  # saved at the step it stopped

    proc = start(overrides, "--resume")
    seen = wait_for_checkpoint(run, proc, newer_than=stopped)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait(timeout=60)
    # a save interrupted by the kill leaves only a temporary folder, never a step_* folder
    (run / "checkpoints" / f".tmp_step_{seen + 1:07d}_999").mkdir()
    last = int(list_checkpoints(run)[-1].name.split("_")[1])
    assert last >= seen

    proc = start(tiny_overrides + [f"--train.steps={last + 3}", "--train.save_every=5"], "--resume")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"resumed from {run / 'checkpoints' / f'step_{last:07d}'} at step {last}" in out
    assert list_checkpoints(run)[-1].name == f"step_{last + 3:07d}"
    assert not list((run / "checkpoints").glob(".tmp_step_*"))  # the stale temporary folder is gone
