"""The latent path end to end on CPU: a tiny random AutoencoderKL saved to disk and loaded through
`model.vae`, the way a user's VAE is; training in every phase mode, exact resume, the recorded VAE,
generate / detect / eval on a latent checkpoint."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")

from resume_check import assert_same_weights, resume_after_kill  # noqa: E402
from tiny_vae import make_tiny_vae  # noqa: E402
from unigendet import load_config  # noqa: E402
from unigendet.cli import main  # noqa: E402
from unigendet.data.pack import pack_folder  # noqa: E402
from unigendet.train import CheckpointError, Trainer, list_checkpoints  # noqa: E402

# 32 px: 8x8 tokens each; the published layout (the detector reads the latent stream, not the reverse)
LATENT = ["--model.latent_patch_size=2", "--model.g2d=false", "--model.d2g=true"]
TINY = ["--model.width=32", "--model.depth=2", "--model.heads=2", "--model.kv_heads=1", "--model.align_layer=1",
        "--model.projector_hidden=32", "--train.batch_size=8", "--phases.pool_size=16", "--phases.refill_count=8",
        "--phases.sampler_steps=2", "--train.progress=false", "--data.num_workers=0", "--train.log_every=2",
        "--optim.warmup_steps=2", "--eval.num_images=8", "--eval.sampler_steps=2", "--eval.batch_size=8"]


def latent_args(demo_root, vae_dir, out, *extra):
    return [f"--data.root={demo_root / 'train'}", f"--eval.data={demo_root / 'val'}", f"--train.out_dir={out}",
            f"--model.vae={vae_dir}", *LATENT, *TINY, *extra]


@pytest.fixture(scope="module")
def latent_run(demo_root, vae_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("latent_run")
    assert main(["train", "--config", "tiny_cpu", *latent_args(demo_root, vae_dir, run, "--train.steps=4",
                                                              "--train.save_every=2")]) == 0
    return run


def test_training_on_packed_latents_never_encodes(demo_root, vae_dir, tmp_path):
    """Shards packed with the run's VAE: the loader hands the trainer their moments, no batch is encoded."""
    pack_folder(demo_root / "train", tmp_path / "shards", samples_per_shard=300, vae=vae_dir, image_size=32)
    args = latent_args(demo_root, vae_dir, tmp_path / "run", "--train.steps=2", "--train.save_every=2",
                       "--data.crop=center")
    cfg = load_config("tiny_cpu", [*args, f"--data.root={tmp_path / 'shards'}"])
    trainer = Trainer(cfg, log=lambda *_: None)
    assert trainer.loader.latents
    encodes = []
    trainer.vae.encode_moments = lambda images: encodes.append(images.shape) or None
    trainer.train()
    assert encodes == [] and trainer.step_idx == 2


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("d2g", [True, False])
@pytest.mark.parametrize("mode, parts", [("alternate", ("gen/flow", "gen/auth", "gen/align", "det/bce")),
                                         ("joint", ("joint/flow", "joint/auth", "joint/align", "joint/bce")),
                                         ("diga", ("diga/flow", "diga/auth", "diga/align"))])
def test_every_phase_mode_trains(mode, parts, d2g, demo_root, vae_dir, tmp_path):
    cfg = load_config("tiny_cpu", latent_args(demo_root, vae_dir, tmp_path / "run", "--train.steps=4",
                                              "--train.save_every=4", f"--phases.mode={mode}",
                                              f"--model.d2g={str(d2g).lower()}"))
    trainer = Trainer(cfg, log=lambda *_: None)
    before = [p.detach().clone() for p in trainer.model.gen_embed.parameters()]
    trainer.train()
    rows = metrics(tmp_path / "run")
    assert all(k in rows[-1] and rows[-1][k] == rows[-1][k] for k in parts), rows[-1]  # present, not NaN
    assert trainer.model.gen_embed.proj.weight.shape == (32, 4 * 2 * 2)  # latent patches: K p_lat^2
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.gen_embed.parameters()))
    if mode != "diga":  # the fake pool holds decoded images the detector trained on
        assert trainer.pool.images.shape[1:] == (3, 32, 32) and trainer.pool.count > 0
        if d2g:  # and beside them the posterior means of those images, which `detect` would encode
            n = trainer.pool.count
            torch.testing.assert_close(trainer.pool.latents[:n], trainer.vae.encode_latents(trainer.pool.images[:n]))
        else:
            assert trainer.pool.latents is None


def test_resume_is_exact(demo_root, vae_dir, tmp_path):
    common = ["--train.steps=6", "--phases.refill_every=2", "--phases.max_fake_age=0"]
    a = Trainer(load_config("tiny_cpu", latent_args(demo_root, vae_dir, tmp_path / "a", *common,
                                                    "--train.save_every=6")), log=lambda *_: None)
    a.train()
    first = load_config("tiny_cpu", latent_args(demo_root, vae_dir, tmp_path / "b", *common, "--train.save_every=3"))
    c = resume_after_kill(first, kill_at=3)
    assert_same_weights(a, c)
    torch.testing.assert_close(a.pool.images, c.pool.images, rtol=0, atol=0)
    torch.testing.assert_close(a.pool.latents, c.pool.latents, rtol=0, atol=0)


def test_checkpoint_records_the_vae_and_refuses_another(latent_run, demo_root, vae_dir, tmp_path, capsys):
    from unigendet.train.checkpoint import checkpoint_vae
    from unigendet.vae import vae_fingerprint

    ckpt = list_checkpoints(latent_run)[-1]
    assert checkpoint_vae(ckpt) == {"vae_path": str(vae_dir), "vae_sha256": vae_fingerprint(vae_dir)}
    # the same folder, other weights: resume and eval refuse it, naming both
    run = tmp_path / "run"
    shutil.copytree(latent_run, run)
    other = tmp_path / "other_vae"
    shutil.copytree(vae_dir, other)
    make_tiny_vae(vae_dir.parent / "swap", seed=5)
    cfg = load_config("tiny_cpu", latent_args(demo_root, other, run, "--train.steps=6", "--train.save_every=2"))
    shutil.copy(vae_dir.parent / "swap" / "diffusion_pytorch_model.safetensors", other)
    with pytest.raises(CheckpointError, match=f"trained with the VAE {vae_dir} .* but the VAE now is {other}"):
        Trainer(cfg, resume=True, log=lambda *_: None)
    step = tmp_path / "step_0000004"
    shutil.copytree(ckpt, step)
    text = (step / "config.toml").read_text()
    (step / "config.toml").write_text(text.replace(f'vae = "{vae_dir}"', f'vae = "{other}"'))
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(step), "--data", str(demo_root / "val"), "--out", str(tmp_path / "r"),
                 "--num-images", "4"]) != 0
    err = capsys.readouterr().err
    assert f"trained with the VAE {vae_dir}" in err and f"the VAE now is {other}" in err and err.count("\n") == 1


def test_generate_detect_eval_on_a_latent_checkpoint(latent_run, demo_root, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert main(["generate", "--ckpt", str(latent_run), "--n", "4", "--out", str(out), "--steps", "2"]) == 0
    assert Image.open(out).size == (2 + 2 * 34, 2 + 2 * 34)  # decoded 32-px images
    assert main(["generate", "--ckpt", str(latent_run), "--n", "2", "--out-dir", str(tmp_path / "pngs"),
                 "--steps", "2"]) == 0
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 2
    capsys.readouterr()
    good = sorted((demo_root / "val" / "real").iterdir())[:2]
    assert main(["detect", "--ckpt", str(latent_run), *map(str, good), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and all(0 <= r["p_fake"] <= 1 for r in rows)
    report = tmp_path / "report"
    assert main(["eval", "--ckpt", str(latent_run), "--data", str(demo_root / "val"), "--out", str(report),
                 "--num-images", "8", "--with-init"]) == 0
    m = json.loads((report / "metrics.json").read_text())
    assert all(m[k] == m[k] for k in ("det_auc", "fid", "kid", "fid_init"))


def test_export_of_a_latent_detector_keeps_the_encoder_and_matches_detect(latent_run, demo_root, tmp_path, capsys):
    """With d2g the exported graph encodes the image (the VAE's encoder inside, never its decoder) and
    scores what `detect` scores."""
    ort = pytest.importorskip("onnxruntime", reason='onnxruntime is not installed: pip install ".[export]"')
    pytest.importorskip("onnxscript", reason='onnxscript is not installed: pip install ".[export]"')
    import numpy as np

    from unigendet.data import load_rgb

    files = sorted((demo_root / "val" / "real").iterdir())[:3]
    capsys.readouterr()
    assert main(["detect", "--ckpt", str(latent_run), *map(str, files), "--json", "--quiet"]) == 0
    detect = {json.loads(line)["file"]: json.loads(line)["p_fake"] for line in capsys.readouterr().out.splitlines()}
    path = tmp_path / "detector.onnx"
    assert main(["export", "--ckpt", str(latent_run), "--out", str(path)]) == 0
    import onnx

    weights = [w.name for w in onnx.load(str(path)).graph.initializer]
    assert any(n.startswith("encoder.encoder.") for n in weights) and not any("decoder" in n for n in weights)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for f in files:
        (p,) = session.run(["p_fake"], {"images": np.asarray(load_rgb(f))[None]})[0]
        assert abs(float(p) - detect[str(f)]) <= 1e-4, f


def test_detect_needs_the_vae_only_with_d2g(latent_run, demo_root, vae_dir, tmp_path, capsys):
    """Without d2g detection reads pixels only: a latent checkpoint scores images with its VAE folder
    gone. With d2g it encodes them, so the missing VAE is a one-line error naming it."""
    no_d2g = tmp_path / "no_d2g"
    assert main(["train", "--config", "tiny_cpu", *latent_args(demo_root, vae_dir, no_d2g, "--train.steps=2",
                                                              "--train.save_every=2", "--model.d2g=false")]) == 0
    good = sorted((demo_root / "val" / "real").iterdir())[:1]
    for run, works in ((no_d2g, True), (latent_run, False)):
        copy = tmp_path / f"copy_{run.name}"
        shutil.copytree(run, copy)
        step = list_checkpoints(copy)[-1]
        text = (step / "config.toml").read_text()
        (step / "config.toml").write_text(text.replace("vae = \"", f"vae = \"{tmp_path / 'gone'}"))
        capsys.readouterr()
        code = main(["detect", "--ckpt", str(step), str(good[0]), "--json"])
        out, err = capsys.readouterr()
        if works:
            assert code == 0 and 0 <= json.loads(out)["p_fake"] <= 1
        else:
            assert code != 0 and str(tmp_path / "gone") in err and err.count("\n") == 1, err
