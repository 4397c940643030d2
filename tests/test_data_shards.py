"""Webdataset shards (`unigendet data pack`: engine/data/pack.py, engine/data/sources/shards.py): what
pack writes, DALI reading its index files, both loaders on shards (labels, rank sharding, resume), and
bad files inside shards."""
from __future__ import annotations

import json
import os
import re
from collections import Counter

import numpy as np
import pytest
import torch

from test_data import S, _make_root, _take
from test_data_dali import assert_same_samples
from unigendet.cli import main as cli_main
from unigendet.data import (DataError, FolderDataset, FolderLoader, build_loader, check_folder, default_quarantine_path,
                            load_eval_images, pack_folder, scan_data, scan_folder)
from unigendet.data.loaders.dali import DaliLoader
from unigendet.data.quarantine import write_quarantine
from unigendet.data.sources.shards import MANIFEST_NAME


def samples(index) -> Counter:
    """Multiset of (encoded bytes, is_fake, class name) of an index: what a dataset holds."""
    names = index.classes
    return Counter((index.read_bytes(i), index.is_fake[i], names[c] if c >= 0 else None)
                   for i, c in enumerate(index.class_ids))


@pytest.fixture
def labelled(tmp_path):
    """An image folder with two classes and fakes, and its shards (4 samples per shard)."""
    root = _make_root(tmp_path / "src", n_real=9, n_fake=5, classes=("cat", "dog"))
    manifest = pack_folder(root, tmp_path / "shards", samples_per_shard=4, seed=3)
    return root, str(tmp_path / "shards"), manifest


def test_pack_holds_every_image_with_its_labels(labelled):
    root, shards, manifest = labelled
    folder, packed = scan_folder(root), scan_data(shards)
    assert packed.classes == folder.classes == ["cat", "dog"]
    assert samples(packed) == samples(folder)
    assert (manifest["num_samples"], manifest["num_real"], manifest["num_fake"]) == (14, 9, 5)
    assert [s["samples"] for s in manifest["shards"]] == [4, 4, 4, 2]
    assert sorted(os.listdir(shards)) == sorted([MANIFEST_NAME] + [f"shard-00000{k}.{e}" for k in range(4)
                                                                   for e in ("tar", "idx")])
    assert all(re.fullmatch(rf"{re.escape(shards)}/shard-00000\d\.tar:\d{{9}}\.png", f) for f in packed.files)


def test_pack_is_reproducible_and_seeded(labelled, tmp_path):
    root, shards, _ = labelled
    again = pack_folder(root, tmp_path / "again", samples_per_shard=4, seed=3)
    other = pack_folder(root, tmp_path / "other", samples_per_shard=4, seed=4)
    for shard in again["shards"]:
        for name in (shard["tar"], shard["index"]):
            assert (tmp_path / "again" / name).read_bytes() == open(os.path.join(shards, name), "rb").read()
    first = scan_data(shards)
    assert [first.read_bytes(i) for i in range(14)] != [scan_data(tmp_path / "other").read_bytes(i)
                                                        for i in range(14)]
    assert samples(scan_data(tmp_path / "other")) == samples(first) and other["seed"] == 4


def test_index_files_are_dalis(labelled):
    """The .idx files equal DALI's own wds2idx output and feed fn.readers.webdataset."""
    from nvidia.dali import fn, pipeline_def, types
    from wds2idx import IndexCreator

    _, shards, manifest = labelled
    tars = [os.path.join(shards, s["tar"]) for s in manifest["shards"]]
    idxs = [os.path.join(shards, s["index"]) for s in manifest["shards"]]
    for tar, idx in zip(tars, idxs):
        with IndexCreator(tar, idx + ".ref", verbose=False) as creator:
            creator.create_index()
        assert open(idx + ".ref").read() == open(idx).read()
        os.remove(idx + ".ref")

    @pipeline_def(batch_size=7, num_threads=1, device_id=None)
    def read_shards():
        images, classes, fakes = fn.readers.webdataset(
            paths=tars, index_paths=idxs, ext=["png;jpg;jpeg;bmp;webp", "cls", "fake"],
            missing_component_behavior="error", random_shuffle=False, dtypes=[types.UINT8] * 3)
        return images, classes, fakes

    pipe = read_shards()
    pipe.build()
    index = scan_data(shards)
    got = []
    for _ in range(2):
        images, classes, fakes = pipe.run()
        got += [(np.array(images[k]).tobytes(), int(np.array(fakes[k]).tobytes()), int(np.array(classes[k]).tobytes()))
                for k in range(7)]
    assert got == [(index.read_bytes(i), index.is_fake[i], index.class_ids[i]) for i in range(14)]


@pytest.mark.parametrize("loader", ["pil", "dali"])
def test_loaders_on_shards(labelled, loader):
    _, shards, _ = labelled
    made = build_loader(shards, S, 4, seed=1, num_workers=0, loader=loader)
    assert isinstance(made, DaliLoader) == (loader == "dali") and made.num_classes == 2
    for batch in _take(made, 5):  # 3 batches per epoch: crosses an epoch boundary
        batch.validate()
        assert batch.images.shape == (4, 3, S, S)


def test_dali_and_pil_give_the_same_samples_from_shards(labelled):
    _, shards, _ = labelled
    pil = _take(build_loader(shards, S, 7, seed=2, num_workers=0, loader="pil"), 3)
    assert_same_samples(pil, _take(build_loader(shards, S, 7, seed=2, loader="dali"), 3))


def test_a_shard_member_decodes_to_the_pixels_of_its_source_file(labelled):
    root, shards, _ = labelled
    folder, packed = scan_folder(root), scan_data(shards)
    position = {folder.read_bytes(j): j for j in range(len(folder))}
    from_folder = FolderDataset(folder, S, seed=0, train=False)
    from_shards = FolderDataset(packed, S, seed=0, train=False)
    for i in range(len(packed)):
        j = position[packed.read_bytes(i)]
        image, is_fake, class_id = from_shards[i]
        torch.testing.assert_close(image, from_folder[j][0], rtol=0, atol=0)
        assert (is_fake, class_id) == from_folder[j][1:]


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_cover_every_sample_once_per_epoch(labelled, world_size):
    _, shards, _ = labelled
    index = scan_data(shards)
    ranks = [FolderLoader(index, S, 2, seed=4, rank=r, world_size=world_size, num_workers=0)
             for r in range(world_size)]
    for epoch in (0, 1):
        seen = [i for loader in ranks for batch in loader.epoch_batches(epoch) for i in batch]
        per_rank = len(index) // world_size // 2 * 2
        assert len(seen) == len(set(seen)) == per_rank * world_size  # disjoint, equal counts


def test_resume_on_shards_continues_the_epoch(labelled):
    _, shards, _ = labelled
    straight = _take(build_loader(shards, S, 4, seed=2, num_workers=0), 6)
    first = build_loader(shards, S, 4, seed=2, num_workers=0)
    _take(first, 4)
    resumed = build_loader(shards, S, 4, seed=2, num_workers=2)
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(straight[4:], _take(resumed, 2)):
        assert torch.equal(a.images, b.images) and torch.equal(a.class_ids, b.class_ids)


def test_eval_images_from_shards(labelled):
    root, shards, _ = labelled
    images, is_fake = load_eval_images(shards, S)
    folder_images, folder_fake = load_eval_images(root, S)
    assert images.shape == folder_images.shape == (14, 3, S, S) and is_fake.sum() == folder_fake.sum() == 5


# ------------------------------------------------------------------------------------------ bad files

def test_pack_refuses_bad_files_and_leaves_quarantined_ones_out(bad_root, tmp_path, snapshot):
    root, expected = bad_root
    before = snapshot(root)
    with pytest.raises(DataError, match=rf"{len(expected)} unreadable image\(s\).*nothing was written.*"
                                        rf"unigendet data check"):
        pack_folder(root, tmp_path / "refused")
    assert not os.path.exists(tmp_path / "refused")  # checked before anything is written
    write_quarantine(default_quarantine_path(root), check_folder(root).bad)
    manifest = pack_folder(root, tmp_path / "packed")
    assert manifest["num_samples"] == 12 and manifest["quarantined"] == len(expected)
    assert samples(scan_data(tmp_path / "packed")) == samples(scan_folder(root))
    assert {k: v for k, v in snapshot(root).items() if k != ".unigendet_quarantine.tsv"} == before


def test_bad_members_are_found_named_and_quarantined(bad_root, tmp_path, snapshot):
    """Shards packed without verification hold every bad kind: `data check SHARDS` gives each member
    the reason the folder check gives its source file; loaders stop naming the member, then skip it."""
    root, expected = bad_root
    shards = tmp_path / "shards"
    pack_folder(root, shards, samples_per_shard=5, verify=False)
    before = snapshot(shards)
    with pytest.raises(DataError, match=rf"shard-\d{{6}}\.tar:\d{{9}}\.\w+: cannot decode image.*"
                                        rf"`unigendet data check {re.escape(str(shards))}`"):
        _take(build_loader(shards, S, 22, num_workers=0), 1)
    by_bytes = {open(os.path.join(root, rel), "rb").read(): reason for rel, reason in expected.items()}
    packed = scan_data(shards)
    result = check_folder(shards)
    assert Counter(b.reason for b in result.bad) == Counter(expected.values())
    for bad in result.bad:
        assert re.fullmatch(r"shard-\d{6}\.tar:\d{9}\.\w+", bad.path)
        assert by_bytes[packed.read_bytes(packed.files.index(os.path.join(str(shards), bad.path)))] == bad.reason
    assert snapshot(shards) == before
    write_quarantine(default_quarantine_path(shards), result.bad)
    for loader in ("pil", "dali"):
        made = build_loader(shards, S, 4, seed=0, num_workers=0, loader=loader)
        assert len(made.index) == 12 and len(made.index.skipped) == len(expected)
        for batch in _take(made, 4):
            batch.validate()


def test_damaged_shards_folders_name_the_file(labelled, tmp_path):
    _, shards, manifest = labelled
    manifest_path = os.path.join(shards, MANIFEST_NAME)
    tar = os.path.join(shards, "shard-000001.tar")
    os.rename(manifest_path, manifest_path + ".away")
    with pytest.raises(DataError, match=f"{re.escape(manifest_path)}: missing.*interrupted"):
        scan_data(shards)
    with open(manifest_path, "w") as f:
        json.dump({**manifest, "version": 99}, f)
    with pytest.raises(DataError, match="shards format version 99"):
        scan_data(shards)
    with open(manifest_path, "w") as f:
        json.dump({**manifest, "shards": "x"}, f)
    with pytest.raises(DataError, match="field 'shards'"):
        scan_data(shards)
    os.replace(manifest_path + ".away", manifest_path)
    os.truncate(tar, os.path.getsize(tar) // 3)
    with pytest.raises(DataError, match=r"shard-000001\.idx: line \d+: member .* lies outside .*shard-000001\.tar"):
        scan_data(shards)


def test_cli_pack(labelled, tmp_path, capsys):
    root, _, _ = labelled
    assert cli_main(["data", "pack", root, "--out", str(tmp_path / "cli"), "--samples-per-shard", "10"]) == 0
    out = capsys.readouterr().out
    assert "14 images (9 real, 5 fake) in 2 shard(s)" in out and f"--data.root={tmp_path / 'cli'}" in out
    assert cli_main(["data", "pack", root, "--out", str(tmp_path / "cli")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert cli_main(["data", "check", str(tmp_path / "cli")]) == 0
    assert "14 images checked, 0 unreadable" in capsys.readouterr().out


def test_training_reads_shards(demo_root, tiny_overrides, tmp_path):
    from unigendet.config import load_config
    from unigendet.train import Trainer

    pack_folder(demo_root / "train", tmp_path / "shards", samples_per_shard=400)
    cfg = load_config("tiny_cpu", tiny_overrides + [f"--data.root={tmp_path / 'shards'}", "--train.steps=2",
                                                    "--train.save_every=2"])
    last = Trainer(cfg, log=lambda *_: None).train()
    assert last["step"] == 2 and last["skipped_steps"] == 0
    assert all(np.isfinite(v) for k, v in last.items() if isinstance(v, float))
