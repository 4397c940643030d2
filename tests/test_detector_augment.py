"""Detector-input augmentation ([augment]): real and generated images alike, exact resume, off = unchanged."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from resume_check import resume_after_kill
from unigendet.config import AugmentConfig, ConfigError, load_config
from unigendet.train import Trainer
from unigendet.train.detector_augment import DetectorAugment, build_detector_augment, jpeg_round_trip

ONE_AT_A_TIME = {"crop": {"crop_p": 1.0}, "jitter": {"jitter_p": 1.0}, "blur": {"blur_p": 1.0},
                 "jpeg": {"jpeg_p": 1.0}}


def _photo(size=32) -> torch.Tensor:
    import skimage.data

    img = Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(127.5).sub(1)  # (3, S, S)


def _gen(seed=0):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_off_by_default_and_with_zero_probabilities():
    assert build_detector_augment(AugmentConfig()) is None
    assert build_detector_augment(AugmentConfig(crop_scale=(0.2, 0.3), jpeg_quality=(10, 20))) is None
    assert isinstance(build_detector_augment(AugmentConfig(blur_p=0.1)), DetectorAugment)


@pytest.mark.parametrize("name", ONE_AT_A_TIME)
def test_each_augmentation_changes_rows_with_its_probability(name):
    x = _photo().expand(64, -1, -1, -1).contiguous()
    always = DetectorAugment(AugmentConfig(**ONE_AT_A_TIME[name]))(x, _gen())
    assert always.shape == x.shape and always.dtype == x.dtype
    assert always.min() >= -1 and always.max() <= 1
    changed = (always - x).abs().flatten(1).amax(1) > 1e-3
    assert changed.all(), name
    half = {k: 0.5 for k in ONE_AT_A_TIME[name]}
    out = DetectorAugment(AugmentConfig(**half))(x, _gen())
    kept = (out == x).flatten(1).all(1)  # rows left alone are bit-identical
    assert 10 < int(kept.sum()) < 54, name
    assert not torch.equal(always[0], always[1]) or name == "jpeg"  # random parameters per row


def test_real_and_fake_rows_get_the_same_distribution():
    """The augmentation never sees labels: the first and the second half of a batch (real rows,
    then pool fakes in the det phase) are changed alike."""
    cfg = AugmentConfig(crop_p=0.5, jitter_p=0.5, blur_p=0.5, jpeg_p=0.5)
    x = _photo().expand(1024, -1, -1, -1).contiguous()
    change = (DetectorAugment(cfg)(x, _gen(3)) - x).abs().flatten(1).mean(1)  # (N,)
    first, second = change[:512], change[512:]
    assert abs(float(first.mean() - second.mean())) < 0.1 * float(change.mean())
    assert abs(float((first == 0).float().mean() - (second == 0).float().mean())) < 0.06  # 1/16 untouched


def test_phase_loss_augments_the_whole_det_batch(tiny_overrides):
    """Real rows and fake-pool rows go through one augmentation call; the generator pass does not."""
    from unigendet.phase_modes import PHASES
    from unigendet.train.phases import phase_loss
    from unigendet.model import UniGenDet

    cfg = load_config("tiny_cpu", tiny_overrides)
    model = UniGenDet(cfg.model)
    seen = []

    def spy(images, generator):
        seen.append(images.shape[0])
        return images.flip(0)

    images, fakes = torch.rand(4, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    ids = torch.full((4,), -1)
    for name, rows in (("det", [7]), ("gen", [])):
        seen.clear()
        phase_loss(model, PHASES[name], images, torch.zeros(4), ids, fakes if name == "det" else None, cfg.loss,
                   _gen(), augment=spy)
        assert seen == rows, name


def test_same_draws_same_images():
    cfg = AugmentConfig(crop_p=0.5, jitter_p=0.5, blur_p=0.5, jpeg_p=0.5)
    x = _photo().expand(16, -1, -1, -1).contiguous()
    assert torch.equal(DetectorAugment(cfg)(x, _gen(1)), DetectorAugment(cfg)(x, _gen(1)))
    assert not torch.equal(DetectorAugment(cfg)(x, _gen(1)), DetectorAugment(cfg)(x, _gen(2)))


@pytest.mark.parametrize("quality", [30, 75, 95])
def test_jpeg_round_trip_matches_pillow(quality):
    """The torch round trip loses what a Pillow JPEG loses (chroma upsampling and rounding differ)."""
    x = _photo(64)
    pixels = np.array(((x + 1) * 127.5).round().permute(1, 2, 0).numpy(), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    pil = np.array(Image.open(buf).convert("RGB"), dtype=np.float64)
    ours = ((jpeg_round_trip(x[None], torch.tensor([quality]))[0] + 1) * 127.5).permute(1, 2, 0).numpy()
    assert np.abs(ours - pil).mean() < 4.0
    pil_loss, our_loss = np.abs(pil - pixels).mean(), np.abs(ours - pixels).mean()
    assert 0.7 * pil_loss < our_loss < 1.3 * pil_loss


def test_bad_ranges_are_refused():
    with pytest.raises(ConfigError, match=r"augment.jpeg_quality = \[90, 30\]: min exceeds max"):
        load_config("tiny_cpu", ["--augment.jpeg_quality=90,30"])
    with pytest.raises(ConfigError, match=r"augment.blur_p must be a finite number in \[0, 1\]"):
        load_config("tiny_cpu", ["--augment.blur_p=1.5"])
    with pytest.raises(ConfigError, match=r"augment.crop_scale\[0\] must be"):
        load_config("tiny_cpu", ["--augment.crop_scale=0,1"])


ON = ["--augment.crop_p=0.5", "--augment.jitter_p=0.5", "--augment.blur_p=0.5", "--augment.jpeg_p=0.5"]


def _weights_after(overrides, out_dir, steps=4):
    cfg = load_config("tiny_cpu", overrides + [f"--train.steps={steps}", f"--train.save_every={steps}",
                                               f"--train.out_dir={out_dir}"])
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.train()
    return trainer.model.state_dict()


def test_off_is_bit_identical_and_on_changes_training(tiny_overrides, tmp_path):
    plain = _weights_after(tiny_overrides, tmp_path / "plain")
    zero = _weights_after(tiny_overrides + ["--augment.crop_scale=0.2,0.4", "--augment.jpeg_quality=10,20"],
                          tmp_path / "zero")
    for name, value in plain.items():
        assert torch.equal(value, zero[name]), name
    on = _weights_after(tiny_overrides + ON, tmp_path / "on")
    assert any(not torch.equal(value, on[name]) for name, value in plain.items())


def test_resume_with_augmentation_is_exact(tiny_overrides, tmp_path):
    straight = _weights_after(tiny_overrides + ON, tmp_path / "a", steps=6)
    first = load_config("tiny_cpu", tiny_overrides + ON + ["--train.steps=6", "--train.save_every=3",
                                                           f"--train.out_dir={tmp_path / 'b'}"])
    c = resume_after_kill(first, kill_at=3)
    for name, value in c.model.state_dict().items():
        assert torch.equal(value, straight[name]), name
