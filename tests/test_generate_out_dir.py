"""`unigendet generate --out-dir`: one PNG per image, a manifest, the authenticity gate, determinism."""
import json
import os
import statistics

import pytest

from tiny_checkpoint import write_tiny_checkpoint
from unigendet.cli import main
from unigendet.inference import read_manifest


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("generate") / "run", step=7)


def _generate(ckpt, out, *extra):
    return main(["generate", "--ckpt", str(ckpt), "--out-dir", str(out), "--steps", "2", "--batch-size", "4", *extra])


def _summary(capsys) -> tuple[dict, str]:
    out, err = capsys.readouterr()
    return json.loads(out.strip().splitlines()[-1]), err


@pytest.fixture(scope="module")
def ungated(ckpt, tmp_path_factory):
    """12 images (3 full batches of 4), no gate: the candidates any gated run with seed 0 starts from."""
    out = tmp_path_factory.mktemp("ungated") / "out"
    assert _generate(ckpt, out, "--n", "12") == 0
    return out


def test_files_and_manifest(ckpt, ungated):
    from PIL import Image

    assert sorted(os.listdir(ungated)) == [f"{i:08d}.png" for i in range(12)] + ["manifest.jsonl"]
    assert Image.open(ungated / "00000000.png").size == (32, 32)
    records = read_manifest(ungated)
    assert [r["file"] for r in records] == [f"{i:08d}.png" for i in range(12)]
    assert [r["index"] for r in records] == [r["candidate"] for r in records] == list(range(12))
    for r in records:
        assert (r["seed"], r["step"], r["checkpoint"], r["weights"]) == (0, 7, str(ckpt), "ema")
        assert (r["cfg_scale"], r["sampler_steps"], r["timestep_shift"], r["batch_size"]) == (1.0, 2, 1.0, 4)
        assert 0 < r["p_fake"] < 1
    assert len({r["p_fake"] for r in records}) > 6  # different images, different scores


def test_manifest_p_fake_is_what_detect_reports(ckpt, ungated, capsys):
    assert main(["detect", "--ckpt", str(ckpt), str(ungated), "--json", "--quiet"]) == 0
    detected = {os.path.basename(r["file"]): r["p_fake"] for r in map(json.loads, capsys.readouterr().out.splitlines())}
    for r in read_manifest(ungated):
        assert detected[r["file"]] == pytest.approx(r["p_fake"], abs=1e-6)


def test_same_seed_same_files_other_seed_other_files(ckpt, ungated, tmp_path):
    assert _generate(ckpt, tmp_path / "again", "--n", "12") == 0
    for name in os.listdir(ungated):
        assert (tmp_path / "again" / name).read_bytes() == (ungated / name).read_bytes(), name
    assert _generate(ckpt, tmp_path / "seed1", "--n", "4", "--seed", "1") == 0
    assert (tmp_path / "seed1" / "00000000.png").read_bytes() != (ungated / "00000000.png").read_bytes()
    assert read_manifest(tmp_path / "seed1")[0]["seed"] == 1


def test_gate_keeps_only_images_below_the_threshold(ckpt, ungated, tmp_path, capsys):
    candidates = read_manifest(ungated)
    scores = [r["p_fake"] for r in candidates]
    limit = statistics.median(scores)  # about half of the candidates pass
    passing = [i for i, p in enumerate(scores) if p < limit]
    assert 3 <= len(passing) < 12
    capsys.readouterr()
    assert _generate(ckpt, tmp_path / "gated", "--n", "3", "--max-p-fake", str(limit)) == 0
    summary, err = _summary(capsys)
    kept = read_manifest(tmp_path / "gated")
    # the gate walks the same candidates in order and keeps the first three that pass
    assert [r["candidate"] for r in kept] == passing[:3]
    assert [r["index"] for r in kept] == [0, 1, 2]
    assert all(r["p_fake"] < limit for r in kept)
    for r in kept:
        same = candidates[r["candidate"]]
        assert r["p_fake"] == same["p_fake"]
        assert (tmp_path / "gated" / r["file"]).read_bytes() == (ungated / same["file"]).read_bytes()
    tried = passing[2] + 1
    assert summary["kept"] == 3 and summary["requested"] == 3 and summary["tried"] == tried
    assert summary["acceptance_rate"] == pytest.approx(3 / tried)
    assert f"kept 3 of {tried} candidates ({100 * 3 / tried:.1f}% accepted)" in err, err


def test_gate_stops_at_max_tries(ckpt, ungated, tmp_path, capsys):
    scores = [r["p_fake"] for r in read_manifest(ungated)]
    limit = statistics.median(scores)
    passing = sum(p < limit for p in scores)
    capsys.readouterr()
    code = _generate(ckpt, tmp_path / "short", "--n", "10", "--max-p-fake", str(limit), "--max-tries", "12")
    summary, err = _summary(capsys)
    assert code == 1  # fewer images than asked for: a failure a script notices
    assert (summary["kept"], summary["tried"], summary["requested"]) == (passing, 12, 10)
    assert len(read_manifest(tmp_path / "short")) == passing
    assert len([f for f in os.listdir(tmp_path / "short") if f.endswith(".png")]) == passing
    assert "stopped at --max-tries 12" in err and f"kept {passing} of 12 candidates" in err, err


def test_folder_out_is_the_same_as_out_dir(ckpt, ungated, tmp_path):
    assert main(["generate", "--ckpt", str(ckpt), "--out", str(tmp_path / "plain"), "--n", "4", "--steps", "2",
                 "--batch-size", "4"]) == 0
    assert read_manifest(tmp_path / "plain") == read_manifest(ungated)[:4]


@pytest.mark.parametrize("extra, says", [
    (["--max-tries", "5"], "give --max-p-fake too"), (["--max-p-fake", "0"], "--max-p-fake must be in (0, 1]"),
    (["--max-p-fake", "nan"], "--max-p-fake must be in (0, 1]"),
    (["--max-p-fake", "0.5", "--max-tries", "1"], "--max-tries must be >= --n"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--out", "{tmp}/g.png"], "not both"),
])
def test_bad_gate_values_are_one_line(ckpt, tmp_path, capsys, extra, says):
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    assert _generate(ckpt, tmp_path / "out", "--n", "2", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "out").exists()  # refused before anything was created


def test_gate_needs_a_folder(ckpt, tmp_path, capsys):
    assert main(["generate", "--ckpt", str(ckpt), "--out", str(tmp_path / "g.png"), "--max-p-fake", "0.5"]) == 2
    assert "give --out-dir DIR" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()
