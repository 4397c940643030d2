"""The run-size estimate (engine/train/estimate.py): VAE FLOPs and size against diffusers' own model, a
backbone pass's FLOPs against a counted forward, memory against what small configs really hold on the
CPU, and the configs' header comments against what `unigendet info --config` prints."""
import bisect
import re
import time

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from tiny_vae import make_tiny_vae
from unigendet import ops
from unigendet.cli import main as cli_main
from unigendet.config import CONFIG_DIR, load_config
from unigendet.data import write_demo_dataset
from unigendet.model import UniGenDet
from unigendet.train import Trainer
from unigendet.train.estimate import Pass, estimate, pass_forward_flops
from unigendet.train.throughput import VaeGeometry, stream_tokens, vae_decode_flops, vae_encode_flops, vae_params


def _autoencoder(**kw):
    diffusers = pytest.importorskip("diffusers")
    n = len(kw["block_out_channels"])
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                   up_block_types=("UpDecoderBlock2D",) * n, **kw)


@pytest.mark.parametrize("kw", [
    dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4),
    dict(block_out_channels=(8, 16, 16), layers_per_block=2, latent_channels=16, norm_num_groups=4,
         use_quant_conv=False, use_post_quant_conv=False),
])
def test_vae_flops_and_parameters_match_diffusers(kw):
    """Without the mid block's attention (whose CPU kernel the flop counter does not see), encode and
    decode FLOPs are the convolutions diffusers runs, exactly; the parameter count is exact with it."""
    side = 32
    counted = VaeGeometry(**{k: v for k, v in kw.items() if k != "norm_num_groups"}, mid_block_add_attention=False)
    vae = _autoencoder(**kw, mid_block_add_attention=False)
    x = torch.randn(1, 3, side, side)
    with torch.no_grad():
        with FlopCounterMode(display=False) as enc:
            z = vae.encode(x).latent_dist.mean
        with FlopCounterMode(display=False) as dec:
            vae.decode(z)
    assert vae_encode_flops(counted, side) == enc.get_total_flops()
    assert vae_decode_flops(counted, side) == dec.get_total_flops()
    full = _autoencoder(**kw)
    assert vae_params(VaeGeometry(**{k: v for k, v in kw.items() if k != "norm_num_groups"})) == \
        sum(p.numel() for p in full.parameters())


@pytest.mark.parametrize("overrides", [[], ["--model.g2d=false"], ["--model.mmsa_layers=2"]])
@pytest.mark.parametrize("used", ["g", "d"])
def test_pass_flops_match_a_counted_forward(overrides, used):
    """The backbone's FLOPs of a generation / detection pass (the other stream run only as far as its
    keys are read) equal the matrix multiplies the reference backend runs, within the left-out
    embeddings and heads."""
    cfg = load_config("tiny_cpu", overrides)
    m = cfg.model
    model = UniGenDet(m).eval()
    x = torch.randn(2, 3, m.image_size, m.image_size)
    t_g, t_d = stream_tokens(m)
    expected = 2 * pass_forward_flops(m, Pass(used, m.depth, False), {"g": t_g, "d": t_d})
    ops.set_default_backend("reference")  # attention as matrix multiplies the counter sees
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            if used == "g":
                model("gen", x, torch.full((2,), 0.5))
            else:
                model("det", x)
    finally:
        ops.set_default_backend("auto")
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.03)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("estimate")
    write_demo_dataset(root / "demo", seed=0)
    return root


def _steady_peak(cfg, steps: int = 5) -> float:
    """Peak live tensor bytes while `cfg` trains on the CPU, over the steps after the first (whose
    refill fills the whole pool at once: the estimate's `first_fill`, not its total). Measured from
    the CPU allocator's own allocation and free records (torch.profiler, profile_memory): tensors
    only, none of Python's or the allocator's overheads, from before the Trainer is built."""
    marks = []
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer = Trainer(cfg, log=lambda *_: None)
        for _ in range(steps):
            marks.append(time.time_ns())
            trainer.step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live, peak = 0, 0
    for e in events:
        live += e.nbytes()
        if bisect.bisect(marks, e.start_ns()) >= 2:  # inside the second step or later
            peak = max(peak, live)
    return peak


@pytest.mark.parametrize("case", ["alternate", "joint", "latent"])
def test_memory_estimate_within_15_percent_of_the_measured_peak(case, demo, tmp_path):
    if case == "latent":
        pytest.importorskip("diffusers")
    overrides = {"alternate": [], "joint": ["--phases.mode=joint", "--model.width=128", "--train.batch_size=8"],
                 "latent": [f"--model.vae={make_tiny_vae(tmp_path / 'vae')}", "--model.g2d=false",
                            "--model.d2g=false", "--model.latent_patch_size=2"]}[case]
    cfg = load_config("tiny_cpu", [f"--data.root={demo}/demo/train", f"--train.out_dir={tmp_path}/run",
                                   "--train.device=cpu", "--train.progress=false", "--data.num_workers=0",
                                   *overrides])
    torch.manual_seed(0)
    measured = _steady_peak(cfg)
    estimated = estimate(cfg, bf16=False).memory["total"]
    assert abs(estimated - measured) <= 0.15 * measured, (case, estimated / 2**20, measured / 2**20)


@pytest.mark.parametrize("name", ["base_256", "large_512"])
def test_config_header_states_what_info_prints(name, capsys):
    """The numbers in each sized config's header are the estimate's, as `unigendet info --config`
    prints them, so they cannot go stale."""
    text = (CONFIG_DIR / f"{name}.toml").read_text()
    block = re.search(r"# ESTIMATE-BEGIN\n(.*?)# ESTIMATE-END\n", text, re.S)
    assert block, f"{name}.toml has no ESTIMATE-BEGIN / ESTIMATE-END block"
    header = [line.removeprefix("#").strip() for line in block.group(1).splitlines()]
    assert cli_main(["info", "--config", name]) == 0
    printed = [line.strip() for line in capsys.readouterr().out.splitlines()[1:]]
    assert header == printed[:-1] and printed[-1].startswith("compile on ")
    assert header == estimate(load_config(name)).lines()


def test_sized_configs_fit_their_gpus():
    """base_256 fits one 80 GB H100 and large_512 eight of them, with a tenth left to the allocator."""
    for name, world in (("base_256", 1), ("large_512", 8)):
        est = estimate(load_config(name))
        assert est.world_size == world
        assert max(est.memory["total"], est.first_fill) < 0.9 * 80e9, name
        assert est.tokens[0] + 4 == est.tokens[1]  # the latent and pixel grids match (plus 4 registers)


def test_info_without_config_is_unchanged(capsys):
    assert cli_main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends (auto picks" in out and "parameters:" not in out


def test_vae_flops_per_sample_follow_the_phases(tmp_path):
    """Decoding: L_auth's decode (forward + input-gradient backward) in generating phases and the
    refill's samples; encoding: each generating step's images."""
    pytest.importorskip("diffusers")
    from unigendet.train.throughput import vae_geometry, vae_step_flops

    vae = make_tiny_vae(tmp_path / "vae")
    latent = [f"--model.vae={vae}", "--model.g2d=false", "--model.d2g=false"]
    alternate = load_config("tiny_cpu", latent)
    geometry = vae_geometry(alternate.model)
    dec, enc = vae_decode_flops(geometry, 32), vae_encode_flops(geometry, 32)
    refill = alternate.phases.refill_count / (alternate.phases.refill_every * alternate.train.batch_size)
    assert vae_step_flops(alternate, geometry) == pytest.approx({"vae_decode": dec * (0.5 * 2 + refill),
                                                                 "vae_encode": 0.5 * enc, "vae_encode_detect": 0.0})
    diga = load_config("tiny_cpu", [*latent, "--phases.mode=diga", "--loss.w_auth=0"])
    assert vae_step_flops(diga, geometry) == {"vae_decode": 0.0, "vae_encode": enc, "vae_encode_detect": 0.0}
    assert vae_step_flops(load_config("tiny_cpu"), vae_geometry(load_config("tiny_cpu").model)) == \
        {"vae_decode": 0.0, "vae_encode": 0.0, "vae_encode_detect": 0.0}
    # d2g: every step encodes its batch (the det phase's detection passes read the means too), and the
    # refill's samples, L_auth's decoded x0_hat (forward + input gradient) and augmented inputs are encoded
    d2g = load_config("tiny_cpu", [*latent[:2], "--model.d2g=true"])
    assert vae_step_flops(d2g, geometry) == pytest.approx({"vae_decode": dec * (0.5 * 2 + refill), "vae_encode": enc,
                                                           "vae_encode_detect": enc * (refill + 0.5 * 2)})
    augmented = load_config("tiny_cpu", [*latent[:2], "--model.d2g=true", "--augment.jpeg_p=0.5"])
    assert vae_step_flops(augmented, geometry)["vae_encode_detect"] == pytest.approx(enc * (refill + 0.5 * 2 + 0.5 * 2))


def test_trainer_reports_the_vae_share_apart_from_the_model_mfu(demo, tmp_path):
    pytest.importorskip("diffusers")
    vae = make_tiny_vae(tmp_path / "vae")
    cfg = load_config("tiny_cpu", [f"--data.root={demo}/demo/train", f"--train.out_dir={tmp_path}/run",
                                   "--train.device=cpu", "--train.progress=false", "--data.num_workers=0",
                                   f"--model.vae={vae}", "--model.g2d=false", "--model.d2g=false"])
    trainer = Trainer(cfg, log=lambda *_: None)
    assert trainer._utilisation(100.0) == {}  # CPU: no known peak, no MFU
    trainer.step()  # the demo folder has no packed latents: the steps encode on the fly
    trainer._peak_flops = 1e12
    got = trainer._utilisation(100.0)
    flops = estimate(cfg).flops
    assert got["mfu_vae"] == pytest.approx(100.0 * (flops["vae_decode"] + flops["vae_encode"]
                                                    + flops["vae_encode_detect"]) / 1e12)
    assert got["mfu_with_vae"] == pytest.approx(got["mfu"] + got["mfu_vae"])


def test_latent_bench_splits_the_step_and_says_why_base_256_is_not_measured(tmp_path, monkeypatch):
    """`bench_train_step --latent` on the CPU: the tiny latent row's parts (VAE encode, decode forward
    and backward, refill sampler, optimizer, model) add up to its step, the VAE's part is measured,
    and the GPU-only base_256 row says why it has no numbers."""
    pytest.importorskip("diffusers")
    import bench.common
    from bench import bench_train_step

    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    rows = bench_train_step.main(["--device", "cpu", "--latent", "--steps", "2", "--warmup", "1",
                                  "--model.depth=2", "--model.align_layer=1", "--train.batch_size=4",
                                  "--phases.refill_every=1", "--phases.refill_count=4", "--phases.pool_size=4",
                                  "--phases.max_fake_age=0", "--phases.sampler_steps=1"])
    tiny, base = rows
    assert tiny["config"] == "tiny_latent_cpu" and base == {"config": "base_256", "note": "needs a CUDA device"}
    parts = [tiny[f"{p}_ms"] for p in ("vae_encode", "vae_decode_fwd", "vae_decode_bwd", "refill_model",
                                       "optimizer", "model")]
    assert sum(parts) == pytest.approx(tiny["ms_per_step"])
    assert all(p > 0 for p in parts)  # every step encodes, decodes (L_auth, refill) and steps AdamW
    assert 0 < tiny["vae_share"] < 1
    assert (next(tmp_path.iterdir()) / "bench_train_step_latent.csv").exists()
