"""`unigendet detect` at scale: folders, globs and lists in; batches; CSV / JSON lines out; bad files as rows."""
import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from tiny_checkpoint import write_tiny_checkpoint
from unigendet.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("detect") / "run")


def _image(path, seed, size=(40, 28)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def tree(tmp_path):
    """root/ with nested images, a corrupt PNG, a text file and a hidden image (left out of folder scans)."""
    root = tmp_path / "photos"
    _image(root / "a.png", 0)
    _image(root / "trip" / "b.jpg", 1)
    _image(root / "trip" / "day2" / "c.PNG", 2, size=(25, 50))
    _image(root / "trip" / "day2" / "d.webp", 3)
    (root / "trip" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not the rest of a png")
    (root / "trip" / "notes.txt").write_text("not an image\n")
    _image(root / ".cache" / "thumb.png", 4)
    return root


EXPECTED = ["a.png", "trip/b.jpg", "trip/broken.png", "trip/day2/c.PNG", "trip/day2/d.webp"]


def _rel(rows, root):
    return [os.path.relpath(r["file"], root) for r in rows]


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["file", "p_fake", "label", "error"]
        return list(reader)


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_folder_to_csv_and_jsonl_with_a_corrupt_and_a_non_image_file(ckpt, tree, tmp_path, capsys):
    out_csv, out_jsonl = tmp_path / "results.csv", tmp_path / "results.jsonl"
    assert main(["detect", "--ckpt", str(ckpt), str(tree), "--out", str(out_csv), "--batch-size", "2"]) == 1
    err = capsys.readouterr().err
    assert "4 image(s) scored, 1 error(s), 1 non-image file(s) skipped" in err and "images/s" in err, err
    rows = _read_csv(out_csv)
    assert _rel(rows, tree) == EXPECTED  # sorted, recursive, hidden folder left out, notes.txt skipped
    broken = rows[2]
    assert broken["p_fake"] == "" and broken["label"] == "" and "broken.png" in broken["error"]
    for row in rows[:2] + rows[3:]:
        assert row["error"] == "" and 0 < float(row["p_fake"]) < 1
        assert row["label"] == ("generated" if float(row["p_fake"]) >= 0.5 else "real")

    # JSON lines, another batch size: the same scores (each image is scored on its own)
    assert main(["detect", "--ckpt", str(ckpt), str(tree), "--out", str(out_jsonl), "--batch-size", "3"]) == 1
    records = _read_jsonl(out_jsonl)
    assert [set(r) for r in records] == [{"file", "p_fake", "label", "error"}] * 5
    assert _rel(records, tree) == EXPECTED
    assert records[2]["p_fake"] is None and records[2]["label"] is None and "broken.png" in records[2]["error"]
    for row, record in zip(rows, records):
        if record["error"] is None:
            assert record["p_fake"] == pytest.approx(float(row["p_fake"]), abs=1e-6)
            assert record["label"] == row["label"]


def test_scores_match_the_evaluation_transform(ckpt, tree, tmp_path, capsys):
    """detect sees what `eval` sees: the data package's evaluation images, scored by the same model."""
    import torch

    from unigendet.data import load_eval_images, load_rgb
    from unigendet.eval.evaluate import load_model, score_images
    from unigendet.inference import eval_tensor

    real = tmp_path / "heldout" / "real"
    files = [_image(real / "wide.png", 5, size=(48, 30)), _image(real / "tall.png", 6, size=(21, 37))]
    images, _ = load_eval_images(tmp_path / "heldout", 32)  # sorted: tall, wide
    mine = torch.stack([eval_tensor(load_rgb(p), 32) for p in sorted(files)])
    assert torch.equal(mine, images)

    model, _, _ = load_model(ckpt)
    assert main(["detect", "--ckpt", str(ckpt), str(real), "--format", "jsonl"]) == 0
    scores = [r["p_fake"] for r in map(json.loads, capsys.readouterr().out.splitlines())]
    assert scores == pytest.approx(score_images(model, images, 8, "cpu").tolist(), abs=1e-6)


def test_globs_and_lists(ckpt, tree, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # a recursive glob: image files only (notes.txt would not match anyway), nothing twice
    code = main(["detect", "--ckpt", str(ckpt), "photos/**/*.png", "photos/a.png", "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 1 and err == ""  # broken.png is an error row; --quiet: nothing on stderr
    assert [r["file"] for r in map(json.loads, out.splitlines())] == [
        os.path.join("photos", "a.png"), os.path.join("photos", "trip", "broken.png")]

    # a glob that matches nothing and a folder without images are error rows; the run goes on
    (tmp_path / "empty").mkdir()
    code = main(["detect", "--ckpt", str(ckpt), "photos/*.gif", "empty", "photos/a.png", "--format", "csv"])
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert code == 1
    assert [r["file"] for r in rows] == ["photos/*.gif", "empty", os.path.join("photos", "a.png")]
    assert "no file matches" in rows[0]["error"] and "no image files" in rows[1]["error"]
    assert rows[2]["error"] == "" and rows[2]["p_fake"] != ""

    # @LIST and --from-file: files (any extension: named on purpose) and folders, blank lines skipped
    (tmp_path / "list.txt").write_text("photos/a.png\n\nphotos/trip/day2\nmissing.jpg\n")
    (tmp_path / "more.txt").write_text(f"{tree / 'trip' / 'b.jpg'}\r\n")
    code = main(["detect", "--ckpt", str(ckpt), "@list.txt", "--from-file", "more.txt", "--out", "r.jsonl"])
    records = _read_jsonl(tmp_path / "r.jsonl")
    assert code == 1
    assert [r["file"] for r in records] == ["photos/a.png", os.path.join("photos/trip/day2", "c.PNG"),
                                            os.path.join("photos/trip/day2", "d.webp"), "missing.jpg",
                                            str(tree / "trip" / "b.jpg")]
    assert records[3]["p_fake"] is None and "missing.jpg" in records[3]["error"]
    assert all(r["error"] is None for i, r in enumerate(records) if i != 3)


def test_default_output_and_threshold(ckpt, tree, capsys):
    files = [str(tree / "a.png"), str(tree / "trip" / "b.jpg")]
    assert main(["detect", "--ckpt", str(ckpt), *files]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == files
    scores = [float(line.split("\t")[1].removeprefix("p_fake=")) for line in lines]
    for threshold, expect in (("0", "generated"), ("1", "real")):
        assert main(["detect", "--ckpt", str(ckpt), *files, "--threshold", threshold, "--json"]) == 0
        labels = [r["label"] for r in map(json.loads, capsys.readouterr().out.splitlines())]
        assert labels == [expect, expect], (threshold, scores)


@pytest.mark.parametrize("extra, says", [
    (["--out", "{tmp}/res.png"], "image extension"), (["--out", "{tmp}/res.xyz"], "cannot tell the format"),
    (["--out", "{tmp}/nowhere/res.csv"], "does not exist"), (["--threshold", "1.5"], "--threshold must be in"),
    (["--threshold", "nan"], "--threshold must be in"), (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["@{tmp}/no-such-list.txt"], "cannot read the list"), (["--json", "--format", "csv"], "contradicts"),
])
def test_bad_arguments_are_one_line(ckpt, tree, tmp_path, capsys, extra, says):
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    assert main(["detect", "--ckpt", str(ckpt), str(tree / "a.png"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err


def test_no_input_at_all(ckpt, capsys):
    assert main(["detect", "--ckpt", str(ckpt)]) == 2
    assert "no input" in capsys.readouterr().err


def test_a_folder_that_cannot_be_listed_is_an_error_row(ckpt, tree, capsys, monkeypatch):
    locked, scandir = str(tree / "trip" / "day2"), os.scandir

    def refusing(path="."):  # what a folder without read permission does (root reads them all)
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    code = main(["detect", "--ckpt", str(ckpt), str(tree), "--format", "csv", "--quiet"])
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert code == 1
    assert rows[0]["file"] == str(tree) and rows[0]["error"] == f"{locked}: cannot list this folder (Permission denied)"
    assert _rel(rows[1:], tree) == ["a.png", "trip/b.jpg", "trip/broken.png"]
