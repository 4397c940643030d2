"""The DALI loader (CPU pipeline here, device_id=None): the PIL loader's batches, shards, resume and
bad-file behaviour. The GPU (mixed nvJPEG) variant is the same code with device="cuda"."""
import pytest
import torch

from test_data import write_unusual_images
from unigendet.data import DataError, build_loader
from unigendet.data.check import check_folder
from unigendet.data.loaders.dali import DaliLoader, dali_reason
from unigendet.data.quarantine import write_quarantine

pytestmark = pytest.mark.skipif(dali_reason() is not None, reason=f"{dali_reason()}")
S = 32


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def assert_same_samples(pil_batches, dali_batches):
    """Same files, labels and crops: equal labels, pixels equal up to the resampling filters."""
    for a, b in zip(pil_batches, dali_batches):
        assert b.images.shape == a.images.shape and b.images.dtype == torch.float32
        assert -1.0 <= b.images.min() and b.images.max() <= 1.0
        assert torch.equal(a.is_fake, b.is_fake) and torch.equal(a.class_ids, b.class_ids)
        assert (a.images - b.images).abs().mean() < 0.03


def test_dali_yields_the_pil_loaders_batches_across_an_epoch(demo_root):
    root = demo_root / "train"
    pil = build_loader(root, S, 64, seed=3, num_workers=0, loader="pil")
    dali = build_loader(root, S, 64, seed=3, loader="dali")
    assert isinstance(dali, DaliLoader) and dali.batches_per_epoch == pil.batches_per_epoch
    n = pil.batches_per_epoch + 2  # crosses into the second epoch
    assert_same_samples(take(pil, n), take(dali, n))
    assert dali.state_dict() == pil.state_dict() == {"epoch": 1, "position": 2}


def test_auto_picks_pil_on_cpu(demo_root):
    assert not isinstance(build_loader(demo_root / "train", S, 8, num_workers=0, loader="auto"), DaliLoader)


def test_dali_shards_match_the_pil_shards(demo_root):
    root = demo_root / "train"
    for rank in range(2):
        pil = build_loader(root, S, 32, seed=1, num_workers=0, rank=rank, world_size=2, loader="pil")
        dali = build_loader(root, S, 32, seed=1, rank=rank, world_size=2, loader="dali")
        assert_same_samples(take(pil, 3), take(dali, 3))


def test_dali_resume_continues_with_the_next_batch(demo_root):
    root = demo_root / "train"
    straight = take(build_loader(root, S, 32, seed=2, loader="dali"), 5)
    first = build_loader(root, S, 32, seed=2, loader="dali")
    take(first, 3)
    resumed = build_loader(root, S, 32, seed=2, loader="dali")
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(straight[3:], take(resumed, 2)):
        assert torch.equal(a.images, b.images) and torch.equal(a.is_fake, b.is_fake)


def test_dali_skips_quarantined_files_and_names_an_unlisted_bad_one(bad_root):
    root, _expected = bad_root
    with pytest.raises(DataError, match="unigendet data check"):
        take(build_loader(root, S, 4, seed=0, loader="dali"), 3)  # 12 good + 10 bad files, unlisted
    write_quarantine(root / ".unigendet_quarantine.tsv", check_folder(root).bad)
    batches = take(build_loader(root, S, 4, seed=0, loader="dali"), 6)  # two epochs of the 12 good files
    assert all(b.images.shape == (4, 3, S, S) for b in batches)


def test_dali_loads_unusual_valid_images(tmp_path):
    count = write_unusual_images(tmp_path / "real")
    (batch,) = take(build_loader(tmp_path, S, count, seed=0, loader="dali"), 1)
    batch.validate()
    assert batch.images.shape == (count, 3, S, S) and torch.isfinite(batch.images).all()


def test_dali_writes_into_a_given_buffer(demo_root):
    """write_into: batches decode straight into the consumer's buffer (a trainer's static input for
    CUDA graphs), the same pixels as without it; a buffer of the wrong kind is refused."""
    root = demo_root / "train"
    plain = take(build_loader(root, S, 16, seed=4, loader="dali"), 2)
    loader = build_loader(root, S, 16, seed=4, loader="dali")
    buffer = torch.empty(16, 3, S, S)
    loader.write_into(buffer)
    it = iter(loader)
    for expected in plain:  # compared one by one: the next batch overwrites the buffer
        batch = next(it)
        assert batch.images.data_ptr() == buffer.data_ptr() and torch.equal(batch.images, expected.images)
    with pytest.raises(DataError, match="write_into: need a contiguous float32"):
        loader.write_into(torch.empty(16, 3, S, S, dtype=torch.float16))


def test_trainer_on_dali_decodes_into_its_step_buffer(tiny_overrides):
    from unigendet import load_config
    from unigendet.train import Trainer

    trainer = Trainer(load_config("tiny_cpu", tiny_overrides + ["--data.loader=dali", "--train.steps=3"]),
                      log=lambda *_: None)
    trainer.train()
    assert isinstance(trainer.loader, DaliLoader) and trainer.loader.output is trainer.inputs.images
    assert trainer.skipped_steps == 0
