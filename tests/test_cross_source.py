"""Cross-source evaluation: `unigendet eval --real NAME=DIR --real-sources DIR --fake NAME[=DIR]`."""
import json
import shutil

import numpy as np
import pytest

from unigendet.cli import main
from unigendet.config import ConfigError
from unigendet.eval.cross_source import Source, cross_source_metrics, parse_sources, render_cross_source


def _folder(tmp_path, name, files):
    folder = tmp_path / name
    folder.mkdir(parents=True)
    for f in files:
        shutil.copy(f, folder / f.name)
    return folder


def test_no_flags_no_cross_source():
    assert parse_sources(None, None, None) is None
    assert parse_sources([], [], []) is None


def test_defaults_fill_the_missing_kind(tmp_path):
    (tmp_path / "r").mkdir()
    spec = parse_sources([f"photos={tmp_path / 'r'}"], None)
    assert spec.real == [Source("photos", str(tmp_path / "r"))]
    assert spec.fake == [Source("generated", None)]  # the checkpoint's own generator
    spec = parse_sources(None, ["own", f"other={tmp_path / 'r'}"])
    assert spec.real == [Source("data", None)]  # eval's held-out set
    assert spec.fake == [Source("own", None), Source("other", str(tmp_path / "r"))]


@pytest.mark.parametrize("real,fake,message", [
    (["a", "b"], None, r"--real: eval's held-out real images .* given more than once"),
    (["photos=/no/such/folder"], None, r"/no/such/folder is not a folder"),
    (["=DIR"], None, r"source name '' must start"),
    (["a b={tmp}"], None, r"source name 'a b'"),
    (["a={tmp}", "a={tmp}"], None, r"--real: source name\(s\) \['a'\] given more than once"),
    (None, ["own", "mine"], r"own generator .* given more than once"),
    (None, ["x="], r"empty folder after '='"),
])
def test_bad_sources_are_one_line_errors(tmp_path, real, fake, message):
    fill = lambda values: [v.replace("{tmp}", str(tmp_path)) for v in values] if values else values  # noqa: E731
    with pytest.raises(ConfigError, match=message):
        parse_sources(fill(real), fill(fake))


def test_real_sources_are_the_subfolders(tmp_path):
    for name in ("china", "flower", ".hidden"):
        (tmp_path / "held" / name).mkdir(parents=True)
    spec = parse_sources(["photos"], None, [str(tmp_path / "held")])
    assert [s.name for s in spec.real] == ["photos", "china", "flower"]
    assert spec.real[0].folder is None  # eval's --data images
    assert spec.real[1].folder == str(tmp_path / "held" / "china")
    assert spec.groups == {"held": ["china", "flower"]}
    with pytest.raises(ConfigError, match=r"\['held'\] given more than once"):
        parse_sources([f"held={tmp_path}"], None, [str(tmp_path / "held")])
    with pytest.raises(ConfigError, match=r"heldout_real.*not a folder.*unigendet data demo"):
        parse_sources(None, None, [str(tmp_path / "data" / "heldout_real")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no subfolders"):
        parse_sources(None, None, [str(tmp_path / "empty")])


def test_metrics_per_pair_and_fpr_per_real_source():
    real = {"a": np.array([0.1, 0.2, 0.6, 0.7]), "b": np.array([0.0, 0.1, 0.2, 0.3])}
    fake = {"g": np.array([0.8, 0.9, 0.95, 0.4])}
    cs = cross_source_metrics(real, fake, {"a": "A", "b": "B", "g": None})
    assert cs["threshold"] == 0.5
    assert cs["real"]["a"] == {"folder": "A", "n": 4, "fpr": 0.5}
    assert cs["real"]["b"]["fpr"] == 0.0
    assert cs["fake"]["g"]["detected"] == 0.75
    pairs = {(p["real"], p["fake"]): p for p in cs["pairs"]}
    assert set(pairs) == {("a", "g"), ("b", "g")}
    assert pairs[("b", "g")]["auc"] == 1.0  # every fake above every b photo
    assert pairs[("a", "g")]["auc"] == pytest.approx(14 / 16)  # the fake at 0.4 loses to 0.6 and 0.7
    assert pairs[("a", "g")]["acc"] == pytest.approx(5 / 8)
    text = "\n".join(render_cross_source(cs))
    assert "| a | 4 | 50.0% |" in text and "| b | g | 1.0000 |" in text


def test_eval_cross_source_end_to_end(demo_root, tmp_path):
    """Folders of real and fake images plus the own generator; the FPR of a real source is what
    `detect` calls generated at 0.5 among the same files; without the flags metrics.json is unchanged."""
    from tiny_checkpoint import write_tiny_checkpoint

    run = tmp_path / "run"
    write_tiny_checkpoint(run)
    val = sorted((demo_root / "val" / "real").iterdir())
    train = sorted((demo_root / "train" / "real").iterdir())
    photos = _folder(tmp_path, "photos", val[:6])
    _folder(tmp_path / "held", "one", train[:5])
    _folder(tmp_path / "held", "two", train[5:9])
    others = _folder(tmp_path, "others", train[20:27])
    out = tmp_path / "report"
    assert main(["eval", "--ckpt", str(run), "--data", str(demo_root / "val"), "--out", str(out),
                 "--num-images", "6", "--real", f"photos={photos}", "--real-sources", str(tmp_path / "held"),
                 "--fake", "own", "--fake", f"others={others}"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    cs = m["cross_source"]
    assert list(cs["real"]) == ["photos", "one", "two", "held"] and list(cs["fake"]) == ["own", "others"]
    assert [cs["real"][n]["n"] for n in ("photos", "one", "two", "held")] == [6, 5, 4, 9]
    held = cs["real"]["held"]  # the subfolders pooled
    assert held["fpr"] == pytest.approx((5 * cs["real"]["one"]["fpr"] + 4 * cs["real"]["two"]["fpr"]) / 9)
    assert cs["fake"]["own"]["n"] == 6 and cs["fake"]["others"]["n"] == 6  # at most --num-images per folder
    assert len(cs["pairs"]) == 8
    own = next(p for p in cs["pairs"] if p["real"] == "photos" and p["fake"] == "own")
    assert 0 <= own["auc"] <= 1 and 0 <= own["eer"] <= 1
    assert "## Cross-source detection" in (out / "report.md").read_text()

    from unigendet.eval.evaluate import load_model
    from unigendet.inference import detect_files

    model, cfg, _ = load_model(run)
    rows = [r for batch in detect_files(model, [str(p) for p in sorted(photos.iterdir())], batch_size=4,
                                        image_size=cfg.model.image_size, device="cpu") for r in batch]
    assert cs["real"]["photos"]["fpr"] == pytest.approx(np.mean([r.p_fake >= 0.5 for r in rows]))

    plain = tmp_path / "plain"
    assert main(["eval", "--ckpt", str(run), "--data", str(demo_root / "val"), "--out", str(plain),
                 "--num-images", "6"]) == 0
    p = json.loads((plain / "metrics.json").read_text())
    assert "cross_source" not in p
    assert p["det_auc"] == m["det_auc"] and p["fid"] == m["fid"]
    assert "Cross-source" not in (plain / "report.md").read_text()


def test_bad_folder_stops_eval_before_loading(tmp_path, capsys):
    code = main(["eval", "--ckpt", str(tmp_path / "no_run"), "--real", f"x={tmp_path / 'missing'}"])
    assert code == 2
    assert "missing is not a folder" in capsys.readouterr().err


def test_demo_writes_heldout_sources_never_trained_on(demo_root):
    """heldout_real/SOURCE/ per photograph of another source, listed in demo.json, disjoint from the
    training and validation photographs; cropped and encoded as the demo's (size, RGB JPEG)."""
    from PIL import Image

    from unigendet.data.demo import HELDOUT_CROPS_PER_PHOTO, HELDOUT_DIR

    manifest = json.loads((demo_root / "demo.json").read_text())
    sources = manifest["heldout_sources"]
    assert {"china", "flower"} <= set(sources) and len(sources) >= 4
    assert set(sources).isdisjoint(manifest["train_sources"] + manifest["val_sources"])
    assert sorted(p.name for p in (demo_root / HELDOUT_DIR).iterdir()) == sorted(sources)
    assert manifest["heldout"] == HELDOUT_CROPS_PER_PHOTO * len(sources)
    for source in sources:
        files = sorted((demo_root / HELDOUT_DIR / source).iterdir())
        assert len(files) == HELDOUT_CROPS_PER_PHOTO
        with Image.open(files[0]) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (manifest["size"],) * 2
    spec = parse_sources(None, None, [str(demo_root / HELDOUT_DIR)])
    assert [s.name for s in spec.real] == sorted(sources) and spec.groups == {HELDOUT_DIR: sorted(sources)}


def test_generalisation_ablation_rows_hold_cross_source_columns(demo_root, tmp_path):
    """`eval --ablations --variants generalisation` runs full and the [augment] switches; with
    cross-source sources every row holds fpr[REAL] and auc[REAL|FAKE], subfolders pooled."""
    from unigendet.config import load_config
    from unigendet.eval.ablations import VARIANT_SETS, expand_variants

    assert expand_variants(["generalisation"]) == VARIANT_SETS["generalisation"]
    assert expand_variants(["full", "method"])[:2] == ["full", "no_mmsa"]
    assert expand_variants(None) == VARIANT_SETS["method"]
    with pytest.raises(ConfigError, match="unknown ablation variant"):
        expand_variants(["aug_nope"])
    out = tmp_path / "abl"
    held = tmp_path / "held"
    train = sorted((demo_root / "train" / "real").iterdir())
    _folder(held, "one", train[:4])
    _folder(held, "two", train[4:8])
    args = ["eval", "--ablations", "--config", "tiny_cpu", "--seeds", "0", "--variants", "aug_jpeg",
            "--out", str(out), "--data", str(demo_root / "val"), "--real", "val", "--real-sources", str(held),
            "--fake", "own", f"--data.root={demo_root / 'train'}", "--train.steps=2", "--train.save_every=2",
            "--model.width=32", "--model.depth=2", "--model.heads=2", "--model.kv_heads=1", "--model.align_layer=1",
            "--train.batch_size=8", "--phases.pool_size=16", "--phases.refill_count=8", "--phases.sampler_steps=2",
            "--train.progress=false", "--eval.num_images=8", "--eval.sampler_steps=2", "--eval.batch_size=8"]
    assert main(args) == 0
    result = json.loads((out / "ablations.json").read_text())
    row = result["runs"]["aug_jpeg"][0]
    assert {"fpr[val]", "fpr[held]", "auc[val|own]", "auc[held|own]"} <= set(row)
    assert not any("one" in k or "two" in k for k in row)  # members appear pooled only
    assert load_config(out / "aug_jpeg_seed0" / "config.toml").augment.jpeg_p == 0.5
    assert "fpr[held]" in (out / "ablations.md").read_text()
