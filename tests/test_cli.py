"""The `unigendet` command line: every command, and bad input that must fail clearly and safely."""
import json
import pickle

import pytest

from unigendet.cli import main


@pytest.fixture(scope="module")
def trained_run(demo_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli_run")
    args = ["train", "--config", "tiny_cpu", f"--data.root={demo_root / 'train'}", f"--train.out_dir={run}",
            "--train.steps=4", "--train.save_every=2", "--model.width=32", "--model.depth=2", "--model.heads=2",
            "--model.kv_heads=1", "--model.align_layer=1", "--train.batch_size=8", "--phases.pool_size=16",
            "--phases.refill_count=8", "--phases.sampler_steps=2", "--train.progress=false", "--data.num_workers=0",
            "--eval.num_images=8", "--eval.sampler_steps=2", "--eval.batch_size=8"]
    assert main(args) == 0
    return run


def test_info_lists_backends_and_reasons(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "mmsa_attention" in out and "reference" in out and "torch" in out


def test_data_demo_is_deterministic(tmp_path, capsys):
    assert main(["data", "demo", "--out", str(tmp_path / "d")]) == 0
    counts = json.loads(capsys.readouterr().out.split(": ", 1)[1])
    assert counts["train"] > 500 and counts["val"] > 100
    assert any((tmp_path / "d" / "train" / "real").iterdir())


def test_data_check_quarantines_bad_files_and_changes_nothing(bad_root, snapshot, tmp_path, capsys):
    import re

    from unigendet.data import build_loader

    root, expected = bad_root
    before = snapshot(root)
    assert main(["data", "check", str(root), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{12 + len(expected)} images checked, {len(expected)} unreadable, 12 ok" in out
    for reason in ("empty", "truncated", "not_an_image", "unsupported_format", "decompression_bomb", "corrupt"):
        count = sum(r == reason for r in expected.values())
        assert re.search(rf"^ +{reason} +{count}$", out, re.MULTILINE), (reason, out)
    listing = root / ".unigendet_quarantine.tsv"
    lines = listing.read_text().splitlines()
    assert lines[0] == "path\treason\tdetail"
    rows = [line.split("\t") for line in lines[1:]]
    assert {path: reason for path, reason, _ in rows} == expected and [r[0] for r in rows] == sorted(expected)
    after = snapshot(root)
    assert set(after) - set(before) == {".unigendet_quarantine.tsv"}  # the only file written
    assert {k: after[k] for k in before} == before  # every data file: same bytes, same mtime

    # Deterministic: another worker count writes the same bytes; --out puts the list elsewhere.
    first = listing.read_bytes()
    assert main(["data", "check", str(root), "--workers", "1"]) == 0
    assert listing.read_bytes() == first
    assert main(["data", "check", str(root), "--out", str(tmp_path / "q.tsv")]) == 0
    assert (tmp_path / "q.tsv").read_bytes() == first
    assert "--data.quarantine=" in capsys.readouterr().out
    # The loaders now skip the listed files and train on the rest.
    loader = build_loader(root, 16, 4, num_workers=0)
    assert len(loader.index) == 12
    next(iter(loader)).validate()
    assert {k: snapshot(root)[k] for k in before} == before


def test_data_check_clean_folder_and_bad_arguments(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "real").mkdir()
    for i in range(3):
        Image.new("RGB", (9, 7), (i, 2 * i, 3 * i)).save(tmp_path / "real" / f"{i}.png")
    assert main(["data", "check", str(tmp_path)]) == 0
    assert "3 images checked, 0 unreadable, 3 ok" in capsys.readouterr().out
    assert (tmp_path / ".unigendet_quarantine.tsv").read_text() == "path\treason\tdetail\n"

    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    cases = [
        (["data", "check", str(tmp_path / "nope")], "data root not found"),
        (["data", "check", str(tmp_path / "real")], "must hold real/"),  # a folder without real/
        (["data", "check", str(tmp_path), "--out", str(user_file)], "not a quarantine list; refusing to overwrite"),
        (["data", "check", str(tmp_path), "--out", str(tmp_path / "real" / "list.png")], "image extension"),
        (["data", "check", str(tmp_path), "--out", str(tmp_path / "no" / "list.tsv")], "does not exist"),
        (["data", "check", str(tmp_path), "--workers", "0"], "--workers must be >= 1"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("unigendet data: error: ") and message in err, (argv, err)
    assert user_file.read_text() == "mine"


def test_train_writes_run_folder(trained_run):
    assert (trained_run / "config.toml").is_file() and (trained_run / "metrics.jsonl").is_file()
    assert (trained_run / "checkpoints" / "step_0000004" / "model.safetensors").is_file()


def test_train_unknown_key_fails_before_running(tmp_path, capsys):
    assert main(["train", "--config", "tiny_cpu", "--train.stepz=3", f"--train.out_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert "unknown key train.stepz" in err
    assert not (tmp_path / "x").exists()  # nothing ran


def test_generate(trained_run, tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert main(["generate", "--ckpt", str(trained_run), "--n", "4", "--out", str(out), "--steps", "2"]) == 0
    assert Image.open(out).size == (2 + 2 * 34, 2 + 2 * 34)  # 2x2 grid of 32-px images, 2-px padding


def test_generate_and_eval_timestep_shift_reach_the_sampler(trained_run, demo_root, tmp_path, monkeypatch, capsys):
    import shutil

    import unigendet.eval.evaluate as evaluate_mod

    real, shifts = evaluate_mod.euler_sample, []

    def spy(*args, **kwargs):
        shifts.append(kwargs["shift"])
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_mod, "euler_sample", spy)
    step = tmp_path / "step_0000004"
    shutil.copytree(trained_run / "checkpoints" / "step_0000004", step)
    args = lambda ckpt, *extra: ["generate", "--ckpt", str(ckpt), "--n", "2", "--steps", "2",  # noqa: E731
                                 "--out", str(tmp_path / "g.png"), *extra]
    assert main(args(trained_run)) == 0 and shifts == [1.0]  # the config's eval.timestep_shift (default 1)
    assert main(args(trained_run, "--timestep-shift", "2.5")) == 0 and shifts[-1] == 2.5
    # a checkpoint whose config sets eval.timestep_shift: that is generate's default, the option wins
    text = (step / "config.toml").read_text()
    assert text.count("timestep_shift = 1.0") == 1
    (step / "config.toml").write_text(text.replace("timestep_shift = 1.0", "timestep_shift = 3.0"))
    assert main(args(step)) == 0 and shifts[-1] == 3.0
    assert main(args(step, "--timestep-shift", "1")) == 0 and shifts[-1] == 1.0
    capsys.readouterr()
    for bad in ("0", "-1", "nan", "inf"):
        assert main(args(step, "--timestep-shift", bad)) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith("unigendet generate: error: --timestep-shift must be a finite number > 0"), err
        assert err.count("\n") == 1, err
    assert len(shifts) == 4  # a bad value samples nothing
    # eval samples with the checkpoint config's eval.timestep_shift (the untrained baseline too)
    assert main(["eval", "--ckpt", str(step), "--data", str(demo_root / "val"), "--out", str(tmp_path / "report"),
                 "--num-images", "4", "--with-init"]) == 0
    assert shifts[4:] == [3.0, 3.0]
    # eval's options override the config, and bad values stop before anything is sampled
    assert main(["eval", "--ckpt", str(step), "--data", str(demo_root / "val"), "--out", str(tmp_path / "report"),
                 "--num-images", "4", "--timestep-shift", "1.5", "--steps", "3"]) == 0
    assert shifts[6:] == [1.5]
    capsys.readouterr()
    for bad in (["--timestep-shift", "0"], ["--steps", "0"]):
        assert main(["eval", "--ckpt", str(step), "--num-images", "4", *bad]) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith(f"unigendet eval: error: {bad[0]} must be"), err
        assert err.count("\n") == 1, err
    assert len(shifts) == 7


def test_detect_scores_good_files_and_names_bad_ones(trained_run, demo_root, tmp_path, capsys):
    good = sorted((demo_root / "val" / "real").iterdir())[:2]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code = main(["detect", "--ckpt", str(trained_run), str(good[0]), str(bad), str(good[1]), "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1
    assert [r["file"] for r in rows] == [str(good[0]), str(bad), str(good[1])]
    assert "error" in rows[1] and str(bad) in rows[1]["error"]
    assert 0 <= rows[0]["p_fake"] <= 1 and 0 <= rows[2]["p_fake"] <= 1


def test_eval_writes_report(trained_run, demo_root, tmp_path):
    out = tmp_path / "report"
    assert main(["eval", "--ckpt", str(trained_run), "--data", str(demo_root / "val"), "--out", str(out),
                 "--num-images", "8", "--with-init"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("det_auc", "det_acc", "det_f1", "det_eer", "fid", "kid", "fid_init", "fid_reduction"):
        assert key in m
    assert (out / "samples.png").is_file() and (out / "report.md").is_file() and (out / "calibration.png").is_file()


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/unigendet_pwned",))


def test_garbage_and_malicious_checkpoints_are_refused(trained_run, tmp_path, capsys):
    import shutil

    step = tmp_path / "step_0000004"
    shutil.copytree(trained_run / "checkpoints" / "step_0000004", step)
    (step / "model.safetensors").write_bytes(b"garbage" * 10)
    (step / "ema.safetensors").write_bytes(b"garbage" * 10)
    assert main(["generate", "--ckpt", str(step), "--n", "1", "--out", str(tmp_path / "g.png")]) == 2
    assert "ema.safetensors" in capsys.readouterr().err

    # a pickle that would run a command when unpickled: refused by weights_only=True, nothing runs
    from unigendet.train import CheckpointError, load_trainer_state

    with open(step / "trainer_state.pt", "wb") as f:
        pickle.dump({"format_version": "1", "x": _Exploit()}, f)
    with pytest.raises(CheckpointError, match="trainer_state.pt"):
        load_trainer_state(step)
    import os

    assert not os.path.exists("/tmp/unigendet_pwned")


def test_checkpoint_from_another_version_is_refused(trained_run, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    step = tmp_path / "step_0000004"
    shutil.copytree(trained_run / "checkpoints" / "step_0000004", step)
    save_file(load_file(step / "ema.safetensors"), step / "ema.safetensors", metadata={"format_version": "99"})
    assert main(["detect", "--ckpt", str(step), str(step / "config.toml")]) == 2
    assert "format version '99'" in capsys.readouterr().err


def test_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", "--ckpt", str(tmp_path / "nope")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_ablation_runner_produces_every_row(demo_root, tmp_path, capsys):
    out = tmp_path / "abl"
    args = ["eval", "--ablations", "--config", "tiny_cpu", "--seeds", "0", "--out", str(out),
            "--data", str(demo_root / "val"), f"--data.root={demo_root / 'train'}", "--train.steps=2",
            "--train.save_every=2", "--model.width=32", "--model.depth=2", "--model.heads=2", "--model.kv_heads=1",
            "--model.align_layer=1", "--train.batch_size=8", "--phases.pool_size=16", "--phases.refill_count=8",
            "--phases.sampler_steps=2", "--train.progress=false", "--eval.num_images=8", "--eval.sampler_steps=2",
            "--eval.batch_size=8"]
    assert main(args) == 0
    result = json.loads((out / "ablations.json").read_text())
    from unigendet.eval.ablations import VARIANT_SETS

    ABLATIONS = VARIANT_SETS["method"]  # the default set
    assert list(result["summary"]) == list(ABLATIONS)
    for name, cols in result["summary"].items():
        assert set(cols) == {"det_auc", "fid", "kid", "samples_per_s"}, name
    table = (out / "ablations.md").read_text()
    assert all(f"| {name} |" in table for name in ABLATIONS)
    # the variants really differ: the separate models' config has no MMSA and no DIGA
    from unigendet.config import load_config

    sep = load_config(out / "separate_seed0" / "config.toml")
    assert (sep.model.g2d, sep.model.d2g, sep.loss.lambda_dig) == (False, False, 0.0)
    assert main(["eval", "--ablations", "--variants", "nope", "--out", str(out)]) == 2
    assert "unknown ablation variant" in capsys.readouterr().err
    # finished rows are reused: the same command again trains nothing and gives the same table
    assert main(args) == 0
    assert capsys.readouterr().out.count("reusing") == len(ABLATIONS)
    assert json.loads((out / "ablations.json").read_text()) == result


def test_output_into_a_closed_pipe_ends_quietly():
    """`unigendet info | head -1`: the reader goes away; no traceback, the exit status a killed cat has."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "unigendet.cli", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the child writes anything: its first write fails, deterministically
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
