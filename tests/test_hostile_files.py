"""Hostile inputs, each built in a temp folder: foreign run folders, special files, odd file names,
damaged checkpoints and bad command-line values."""
import json
import os
import shutil

import pytest

from unigendet.cli import main
from unigendet.config import load_config
from unigendet.train import Trainer, TrainingError, list_checkpoints

QUIET = dict(log=lambda *_: None)


def _train(overrides, *extra, resume=False):
    cfg = load_config("tiny_cpu", overrides + list(extra))
    trainer = Trainer(cfg, resume=resume, **QUIET)
    trainer.train()
    return trainer


# ------------------------------------------------------------------------------- run folders


def test_train_refuses_a_folder_that_is_not_a_run(tiny_overrides, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("my own notes\n")
    (run / "checkpoints" / ".tmp_step_0000002_1").mkdir(parents=True)
    (run / "checkpoints" / ".tmp_step_0000002_1" / "thesis.txt").write_text("keep me")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code = main(["train", "--config", "tiny_cpu", *tiny_overrides, "--train.steps=2"])
    err = capsys.readouterr().err
    assert code == 2 and "not a unigendet run folder" in err and str(run) in err
    assert len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # --resume too
    assert main(["train", "--config", "tiny_cpu", *tiny_overrides, "--train.steps=2", "--resume"]) == 2


def test_run_folder_is_marked_and_user_files_survive(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    _train(tiny_overrides, "--train.steps=2", "--train.save_every=2")
    assert (run / ".unigendet_run").is_file()
    ckpts = run / "checkpoints"
    user_tmp = ckpts / ".tmp_step_0000003_1"
    user_tmp.mkdir()
    (user_tmp / "thesis.txt").write_text("keep me")
    ours_tmp = ckpts / ".tmp_step_0000003_2"  # what a kill while saving leaves
    ours_tmp.mkdir()
    (ours_tmp / "model.safetensors").write_bytes(b"partial")
    user_step = ckpts / "step_0000004"  # incomplete step folder holding a user's file
    user_step.mkdir()
    (user_step / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="step_0000004.*did not write"):
        _train(tiny_overrides, "--train.steps=4", "--train.save_every=2", resume=True)
    assert (user_tmp / "thesis.txt").read_text() == "keep me"
    assert not ours_tmp.exists()
    assert (user_step / "notes.txt").read_text() == "mine"


def test_resume_drops_metrics_after_the_checkpoint_and_partial_steps(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    _train(tiny_overrides, "--train.steps=4", "--train.save_every=2", "--train.keep_last=5")
    # a kill after step 4 was logged but while step 4's checkpoint was being pruned: step_0000004 partial
    partial = run / "checkpoints" / "step_0000004"
    (partial / "model.safetensors").unlink()
    _train(tiny_overrides, "--train.steps=6", "--train.save_every=2", "--train.keep_last=5", resume=True)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]  # 4 logged again after resuming from 2, once
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002", "step_0000004", "step_0000006"]


def test_run_from_before_the_marker_still_resumes(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    _train(tiny_overrides, "--train.steps=2", "--train.save_every=2")
    (run / ".unigendet_run").unlink()  # as written by an older unigendet
    with pytest.raises(TrainingError, match="--resume"):
        _train(tiny_overrides, "--train.steps=4", "--train.save_every=2")
    trainer = _train(tiny_overrides, "--train.steps=4", "--train.save_every=2", resume=True)
    assert trainer.step_idx == 4 and (run / ".unigendet_run").is_file()


def test_resume_into_a_new_folder_twice(tiny_overrides, tmp_path):
    """What `make demo` does: train --resume into a folder that does not exist, then again."""
    args = ["train", "--config", "tiny_cpu", *tiny_overrides, "--train.steps=2", "--train.save_every=2", "--resume"]
    assert main(args) == 0
    assert main(args) == 0
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_0000002"]


# ------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained_step(demo_root, tmp_path_factory):
    """A tiny trained checkpoint step folder (read-only use: tests copy it)."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    overrides = [f"--data.root={demo_root / 'train'}", f"--eval.data={demo_root / 'val'}", f"--train.out_dir={run}",
                 "--model.width=32", "--model.depth=2", "--model.heads=2", "--model.kv_heads=1",
                 "--model.align_layer=1", "--model.projector_hidden=32", "--train.batch_size=8",
                 "--phases.pool_size=16", "--phases.refill_count=8", "--phases.sampler_steps=2",
                 "--train.progress=false", "--data.num_workers=0", "--train.log_every=2", "--optim.warmup_steps=2",
                 "--train.steps=2", "--train.save_every=2", "--eval.batch_size=4", "--eval.sampler_steps=2"]
    _train(overrides)
    return list_checkpoints(run)[-1]


def _damaged(step, tmp_path, change):
    """A copy of `step` whose model and ema weights went through change(dict) -> dict."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / step.name
    shutil.copytree(step, out)
    for which in ("model", "ema"):
        tensors = load_file(out / f"{which}.safetensors")
        save_file(change(tensors), out / f"{which}.safetensors", metadata={"format_version": "1", "step": "2"})
    return out


def _first_weight(tensors):
    return next(k for k, v in tensors.items() if v.dim() == 2)


@pytest.mark.parametrize("kind", ["shape", "int64", "nan", "config"])
def test_damaged_checkpoint_is_one_line_exit_2(trained_step, demo_root, tmp_path, capsys, kind):
    import torch

    name = {}

    def change(t):
        key = name.setdefault("key", _first_weight(t))
        if kind == "shape":
            t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1])
        elif kind == "int64":
            t[key] = t[key].round().to(torch.int64)
        elif kind == "nan":
            t[key] = t[key].clone()
            t[key][0, 0] = float("nan")
        return t

    step = _damaged(trained_step, tmp_path, change)
    if kind == "config":  # the step folder's config says another model than its weights hold
        text = (step / "config.toml").read_text()
        (step / "config.toml").write_text(text.replace("width = 32", "width = 64", 1))
    image = next((demo_root / "val" / "real").iterdir())
    code = main(["detect", "--ckpt", str(step), str(image)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "safetensors" in err and "tensor " in err
    if kind != "config":
        assert name["key"] in err
    assert {"shape": "shape", "int64": "int64", "nan": "non-finite", "config": "shape"}[kind] in err


# ------------------------------------------------------------------------------- special files


def _good_root(root, real=8, fake=4):
    import numpy as np
    from PIL import Image

    for label, count in (("real", real), ("fake", fake)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = np.random.default_rng(i + 10 * (label == "fake")).integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"good{i}.png")
    return root


def _special_root(tmp_path):
    root = _good_root(tmp_path / "special")
    os.symlink("/dev/zero", root / "real" / "zero.png")
    os.mkfifo(root / "fake" / "pipe.png")
    os.symlink(root / "real" / "good0.png", root / "real" / "link.png")  # a link to a regular file: fine
    (root / "real" / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(2 * 2**20))
    return root


def test_special_and_oversized_files_are_listed_not_read(tmp_path, capsys):
    from unigendet.data import build_loader, read_quarantine

    root = _special_root(tmp_path)
    assert main(["data", "check", str(root), "--max-file-mb", "1"]) == 0, capsys.readouterr().err
    listed = {b.path: b.reason for b in read_quarantine(root / ".unigendet_quarantine.tsv")}
    assert listed == {"real/zero.png": "not_a_regular_file", "fake/pipe.png": "not_a_regular_file",
                      "real/huge.png": "too_large"}
    loader = build_loader(root, 16, 4, num_workers=0, loader="pil", max_file_mb=1)
    assert len(loader.index) == 13 and len(loader.index.skipped) == 3  # link.png is read
    batch = next(iter(loader))
    assert batch.images.shape == (4, 3, 16, 16)


def test_loaders_stop_on_an_unlisted_special_file(tmp_path):
    from unigendet.data import DataError, load_eval_images

    root = _good_root(tmp_path / "r")
    os.mkfifo(root / "real" / "pipe.png")
    with pytest.raises(DataError, match="pipe.png.*not a regular file"):
        load_eval_images(root, 16)


def test_detect_refuses_special_files(trained_step, tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe.png")
    os.symlink("/dev/zero", tmp_path / "zero.png")
    code = main(["detect", "--ckpt", str(trained_step), str(tmp_path / "pipe.png"), str(tmp_path / "zero.png")])
    out = capsys.readouterr().out
    assert code == 1
    assert out.count("not a regular file") == 2


def test_shard_member_over_the_size_limit_is_listed(tmp_path):
    from unigendet.data import pack_folder, read_quarantine

    src = _good_root(tmp_path / "src")
    (src / "real" / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(2 * 2**20))
    pack_folder(src, tmp_path / "shards", verify=False)
    assert main(["data", "check", str(tmp_path / "shards"), "--max-file-mb", "1"]) == 0
    reasons = {b.reason for b in read_quarantine(tmp_path / "shards" / ".unigendet_quarantine.tsv")}
    assert reasons == {"too_large"}


# ------------------------------------------------------------------------------- file names


def test_names_that_are_not_utf8_or_hold_line_breaks_round_trip(tmp_path, capsys):
    from unigendet.data import read_quarantine, scan_folder

    root = _good_root(tmp_path / "names")
    weird = [b"real/caf\xe9.png", b"real/form\x0cfeed.png", "fake/line\u2028sep.png".encode(),
             b"fake/tab\tnl\nx.png", "real/back\\slash\x85.png".encode()]
    for name in weird:
        with open(os.path.join(os.fsencode(root), name), "wb") as f:
            f.write(b"not an image")
    assert main(["data", "check", str(root)]) == 0, capsys.readouterr().err
    listed = {os.fsencode(b.path) for b in read_quarantine(root / ".unigendet_quarantine.tsv")}
    assert listed == set(weird)
    index = scan_folder(root)
    assert len(index.skipped) == len(weird) and len(index) == 12


def test_old_tsv_lists_still_read(tmp_path):
    from unigendet.data import read_quarantine

    path = tmp_path / "old.tsv"
    path.write_bytes(b"path\treason\tdetail\nreal/a\\tb.png\tcorrupt\tx\nreal/f\x0cg.png\tempty\t0 bytes\n")
    assert [b.path for b in read_quarantine(path)] == ["real/a\tb.png", "real/f\x0cg.png"]


def test_shard_member_with_a_dot_segment_is_skipped_once_listed(tmp_path, capsys):
    import io
    import tarfile

    from unigendet.data import build_loader, pack_folder

    pack_folder(_good_root(tmp_path / "src"), tmp_path / "shards")
    shards = tmp_path / "shards"
    tar_path = shards / "shard-000000.tar"
    with tarfile.open(tar_path, "a") as tar:  # one more sample, its image named sub/./x.png, not an image
        for name, data in (("sub/./x.png", b"garbage"), ("sub/./x.cls", b"-1"), ("sub/./x.fake", b"0")):
            tar.addfile(_info(name, len(data)), io.BytesIO(data))
    with tarfile.open(tar_path) as tar:
        members = [m for m in tar if m.name.startswith("sub/")]
    idx = shards / "shard-000000.idx"
    lines = idx.read_text().splitlines()
    ext = {"sub/./x.png": "png", "sub/./x.cls": "cls", "sub/./x.fake": "fake"}
    lines.append(" ".join(f"{ext[m.name]} {m.offset_data} {m.size} {m.name}" for m in members))
    lines[0] = f"v1.2 {len(lines) - 1}"
    idx.write_text("\n".join(lines) + "\n")
    manifest = json.loads((shards / "unigendet_shards.json").read_text())
    manifest["num_samples"] += 1
    manifest["shards"][0]["samples"] += 1
    (shards / "unigendet_shards.json").write_text(json.dumps(manifest))

    assert main(["data", "check", str(shards)]) == 0, capsys.readouterr().err
    loader = build_loader(shards, 16, 4, num_workers=0, loader="pil")
    assert len(loader.index) == 12 and len(loader.index.skipped) == 1
    it = iter(loader)
    for _ in range(3):
        next(it)


def _info(name, size):
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = size
    return info


# ------------------------------------------------------------------------------- command-line values


@pytest.mark.parametrize("extra, says", [
    (["--n", "0"], "--n must be >= 1"), (["--n", "-1"], "--n must be >= 1"),
    (["--steps", "-3"], "--steps must be >= 1"), (["--n", "100000000"], "a grid image holds at most"),
    (["--out", "{tmp}/grid.xyz"], "unknown extension"), (["--out", "{tmp}/afile/grid.png"], "is a file"),
    (["--out", "/sys/grid.png"], "cannot write"),
])
def test_generate_bad_values_are_one_line(trained_step, tmp_path, capsys, extra, says):
    (tmp_path / "afile").write_text("x")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    args = ["generate", "--ckpt", str(trained_step), "--out", str(tmp_path / "g.png"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "g.png").exists()


def test_generate_into_a_folder_streams_pngs(trained_step, tmp_path):
    from PIL import Image

    out = tmp_path / "samples"
    assert main(["generate", "--ckpt", str(trained_step), "--n", "6", "--out", str(out), "--steps", "1"]) == 0
    files = sorted(os.listdir(out))
    assert files == [f"{i:08d}.png" for i in range(6)] + ["manifest.jsonl"]  # one line per PNG
    assert Image.open(out / files[0]).size == (32, 32)
    assert main(["generate", "--ckpt", str(trained_step), "--n", "1", "--out", str(out)]) == 2  # not empty


def test_data_check_in_a_read_only_folder_offers_out(tmp_path, capsys):
    root = _good_root(tmp_path / "ro")
    if os.geteuid() == 0:  # root writes anywhere: a folder no one may write in stands in
        args = ["data", "check", str(root), "--out", "/sys/quarantine.tsv"]
    else:
        os.chmod(root, 0o555)
        args = ["data", "check", str(root)]
    try:
        assert main(args) == 2
    finally:
        os.chmod(root, 0o755)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write the quarantine list" in err and "--out" in err
