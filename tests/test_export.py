"""`unigendet export`: the detector alone, with its preprocessing, as ONNX and torch.export artefacts
that score raw uint8 images of any size as `unigendet detect` scores the files."""
import contextlib
import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unigendet.cli import main

EXTRA = 'pip install ".[export]"'
SENTINEL = 7.25  # fills the weights the detection pass never reads: no exported tensor may hold it
TOLERANCE = 1e-4
# (height, width): square at the model's size, odd landscape, tall (Pillow 13 resamples it vertical
# pass first: H - S > 2 (W - S)), mildly tall (horizontal first), smaller than S, larger than S
SIZES = [(16, 16), (23, 37), (61, 29), (45, 40), (9, 13), (300, 211), (160, 48)]
REPO = Path(__file__).resolve().parents[1]


def _tiny_run(run_dir: Path) -> Path:
    """A step folder: depth-2 model, image size 16, MMSA in layer 1 only (so the detector reads the
    generator stream's keys in layer 1 and nothing of it in layer 2); EMA weights differ from the
    raw ones; a detector head sensitive to single pixels; the weights the detection pass never
    reads hold SENTINEL."""
    from unigendet.config import load_config
    from unigendet.model import UniGenDet
    from unigendet.train import save_checkpoint

    cfg = load_config("tiny_cpu", ["--model.width=32", "--model.depth=2", "--model.heads=2", "--model.kv_heads=1",
                                   "--model.align_layer=1", "--model.projector_hidden=32", "--data.image_size=16",
                                   "--model.mmsa_layers=1", f"--train.out_dir={run_dir}"])
    assert cfg.eval.use_ema and cfg.model.d2g
    torch.manual_seed(0)
    model = UniGenDet(cfg.model)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01 * torch.randn_like(p))  # export must pick EMA as detect does, or the test fails
        for net in (model, ema):
            # an untrained head gives p_fake ~ 0.5 whatever the pixels: scaled up and centred on a gray
            # image, p_fake spreads over (0, 1) and one pixel off by one level shows
            net.det_head.mlp[2].weight.mul_(3000.0)
            net.det_head.mlp[2].bias.sub_(net("det", torch.zeros(1, 3, 16, 16)).logit)
            for name, p in net.named_parameters():
                if name.startswith(("gen_head.", "projector.", "blocks.1.experts.g.")):
                    p.fill_(SENTINEL)
    return save_checkpoint(run_dir, 3, model, ema, {}, cfg)


def _image(height: int, width: int, seed: int, alpha: bool = False) -> np.ndarray:
    """A smooth gradient with texture (photo-like, so resampling matters), uint8 (H, W, 3 or 4)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 128 + 90 * np.sin(x / (3 + seed) + y / 5.0)[..., None] * np.array([1.0, 0.6, -0.8])
    pixels = np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
    if alpha:
        a = np.clip(255 * x / max(width - 1, 1), 0, 255).astype(np.uint8)[..., None]  # 0 .. 255 left to right
        pixels = np.concatenate([pixels, a], axis=2)
    return pixels


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    step = _tiny_run(root / "run")
    files = []
    for i, (h, w) in enumerate(SIZES):
        files.append(root / f"img_{i}_{h}x{w}.png")
        Image.fromarray(_image(h, w, i)).save(files[-1])
    twin = root / "twin_23x37.png"  # same size as files[1]: the two make a batch of 2
    Image.fromarray(_image(23, 37, 99)).save(twin)
    rgba = root / "alpha_30x40.png"
    Image.fromarray(_image(30, 40, 5, alpha=True), "RGBA").save(rgba)
    files += [twin, rgba]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["detect", "--ckpt", str(step), *map(str, files), "--json", "--quiet"]) == 0
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    detect = {row["file"]: row["p_fake"] for row in rows}
    assert set(detect) == set(map(str, files))
    return {"root": root, "step": step, "files": files, "detect": detect}


@pytest.fixture(scope="module")
def onnx_path(setup):
    pytest.importorskip("onnxruntime", reason=f"onnxruntime is not installed: {EXTRA}")
    pytest.importorskip("onnxscript", reason=f"onnxscript is not installed: {EXTRA}")
    path = setup["root"] / "detector.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", "--ckpt", str(setup["step"]), "--out", str(path)]) == 0
    return path


def _pixels(path) -> np.ndarray:
    from unigendet.data import load_rgb

    return np.asarray(load_rgb(path))  # (H, W, 3) uint8, decoded as detect decodes


def test_onnx_matches_detect_on_images_of_any_size(setup, onnx_path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["p_fake"]
    for path in setup["files"]:
        (p,) = session.run(["p_fake"], {"images": _pixels(path)[None]})[0]
        assert abs(float(p) - setup["detect"][str(path)]) <= TOLERANCE, path
    # a batch of two images of one size: one p_fake each, in order
    pair = [setup["files"][1], setup["files"][len(SIZES)]]
    out = session.run(["p_fake"], {"images": np.stack([_pixels(p) for p in pair])})[0]
    assert out.shape == (2,) and out.dtype == np.float32
    assert np.abs(out - [setup["detect"][str(p)] for p in pair]).max() <= TOLERANCE


def test_onnx_graph_holds_no_weight_the_detector_never_reads(setup, onnx_path):
    import onnx
    from onnx import numpy_helper

    from unigendet.deploy import detector_only
    from unigendet.eval.evaluate import load_model

    model = onnx.load(str(onnx_path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["image_size"] == "16" and meta["weights"] == "ema" and meta["checkpoint"] == str(setup["step"])
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer]
    floats = [a for a in arrays if a.dtype.kind == "f"]
    assert not any(np.any(a == SENTINEL) for a in floats)  # generator head, projector, layer-2 generator expert
    # nothing beyond the detector-only model's tensors (the optimizer may fold transposes and drop
    # the unused query / output / MLP weights of the key-only generator expert, so less is fine)
    full, _, _ = load_model(setup["step"])
    det = detector_only(full)
    allowed = sum(t.numel() for t in [*det.parameters(), *det.buffers()])
    dropped = sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in det.parameters())
    in_graph = sum(a.size for a in floats)
    assert dropped > 0 and in_graph <= allowed, (in_graph, allowed, dropped)


def test_pt2_round_trip_matches_detect(setup, tmp_path):
    path = tmp_path / "detector.pt2"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", "--ckpt", str(setup["step"]), "--out", str(path)]) == 0
    program = torch.export.load(str(path))
    run = program.module()
    for p in setup["files"]:
        got = run(torch.from_numpy(_pixels(p)[None].copy()))
        assert got.shape == (1,) and got.dtype == torch.float32
        assert abs(float(got[0]) - setup["detect"][str(p)]) <= TOLERANCE, p
    # the detector's weights and the shared ones; of the generator only what the detection pass reads:
    # the clean-image embedding (patch projection + one folded t = 0 condition vector) and the layer-1 expert
    names = {k.removeprefix("detector.") for k in program.state_dict}
    from unigendet.eval.evaluate import load_model

    full, _, _ = load_model(setup["step"])
    expected = {n for n, _ in full.named_parameters() if full.param_owner(n) != "gen"}
    expected |= {n for n, _ in full.named_parameters() if n.startswith(("gen_embed.proj.", "blocks.0.experts.g."))}
    assert names == expected | {"gen_embed.condition"}


def test_example_scores_files_like_detect(setup, onnx_path):
    files = [setup["files"][2], setup["files"][-1]]  # a tall image and one with transparency
    done = subprocess.run([sys.executable, str(REPO / "examples" / "detect_onnx.py"), str(onnx_path), *map(str, files)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(files)
    for path, line in zip(files, lines):
        name, score, label = line.split("\t")
        p = float(score.removeprefix("p_fake="))
        assert name == str(path) and abs(p - setup["detect"][str(path)]) <= TOLERANCE
        assert label == ("generated" if p >= 0.5 else "real")


# ----------------------------------------------------------------------------- pieces, no export


@pytest.mark.parametrize("size", [16, 32])
def test_preprocessing_is_detects_transform_bit_for_bit(size):
    from unigendet.deploy import center_crop_resize
    from unigendet.inference import eval_tensor

    rng = np.random.default_rng(size)
    shapes = [(int(h), int(w)) for h, w in rng.integers(1, 120, (30, 2))] + [(5, 120), (120, 5), (100, 40), (40, 100)]
    for h, w in shapes:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mine = center_crop_resize(torch.from_numpy(pixels)[None], size)[0]
        assert torch.equal(mine, eval_tensor(Image.fromarray(pixels), size)), (h, w)


def _variants():
    return {"mot, MMSA in layer 1": ["--model.mmsa_layers=1"], "mot, all layers": [],
            "mot, no d2g": ["--model.d2g=false"], "mot, no MMSA layer": ["--model.mmsa_layers=none"],
            "shared experts, 7 classes": ["--model.experts=shared", "--model.num_classes=7"]}


@pytest.mark.parametrize("name", list(_variants()))
def test_detector_only_keeps_what_the_detection_pass_reads(name):
    from unigendet.config import load_config
    from unigendet.deploy import detector_only
    from unigendet.deploy.detector import generator_layers_read
    from unigendet.model import UniGenDet

    cfg = load_config("tiny_cpu", ["--model.width=32", "--model.depth=3", "--model.heads=2", "--model.kv_heads=1",
                                   "--model.align_layer=1", "--data.image_size=16", *_variants()[name]])
    torch.manual_seed(1)
    model = UniGenDet(cfg.model).eval()
    det = detector_only(model)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(det("det", x).logit, model("det", x).logit, rtol=0, atol=1e-6)
    # no parameter of the copy is one the full pass leaves without gradient, bar the key-only layer's
    # unused rows (queries, output, MLP of the generator expert whose keys the detector reads last)
    model.zero_grad()
    model("det", x).logit.sum().backward()
    unread = {n for n, p in model.named_parameters() if p.grad is None}
    kept = {n for n, _ in det.named_parameters()}
    key_only = f"blocks.{generator_layers_read(model) - 1}.experts.g."
    assert not kept & {n for n in unread if not n.startswith(key_only)}
    assert not any(n.startswith(("gen_head.", "projector.", "gen_embed.time.", "gen_embed.classes."))
                   for n in kept)
    if name in ("mot, no d2g", "mot, no MMSA layer"):
        assert all(model.param_owner(n) != "gen" for n in kept)


def test_reference_ops_forces_the_reference_backend_and_restores(monkeypatch):
    from unigendet import backends
    from unigendet.deploy import reference_ops

    for before in (None, "triton"):
        if before is None:
            monkeypatch.delenv(backends.ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(backends.ENV_VAR, before)
        with reference_ops():
            assert backends._requested("auto") == ("reference", f"${backends.ENV_VAR}")
        assert os.environ.get(backends.ENV_VAR) == before


def test_bad_out_and_missing_packages_are_one_line_errors(setup, tmp_path, monkeypatch, capsys):
    step = str(setup["step"])
    assert main(["export", "--ckpt", step, "--out", str(tmp_path / "detector.txt")]) == 2
    assert "unknown suffix '.txt'; use .onnx (ONNX) or .pt2" in capsys.readouterr().err
    assert main(["export", "--ckpt", step, "--out", str(tmp_path / "missing" / "d.pt2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    assert main(["export", "--ckpt", step, "--out", str(tmp_path / "d.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "onnxscript" in err and 'pip install "unigendet[export]"' in err
    assert not (tmp_path / "d.onnx").exists()
