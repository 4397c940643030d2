"""The benchmark harnesses run end to end on tiny CPU shapes and write the tables they promise."""
import csv
import sys

import pytest
import torch

import bench.common
from bench import bench_rmsnorm, bench_rope, bench_swiglu
from bench.membound import Case, run
from op_testing import EXT_ONLY

MEMBOUND_COLUMNS = {"device", "case", "dtype", "thp", "mode", "provider", "ms", "GB/s", "%copy", "x_eager",
                    "x_compile", "copy_GB/s"}


def tiny_cases(module, shape):
    """The module's case builder, on a tiny shape instead of the benchmark's own."""
    def cases(device, dtype):
        if module is bench_rmsnorm:
            N, C = shape
            x, r, gy, gr = (torch.randn(N, C, dtype=dtype) for _ in range(4))
            w = torch.randn(C, dtype=dtype)
            return [Case("tiny", [x.requires_grad_(), r.requires_grad_(), w.requires_grad_()], [gy, gr], 1, 1)]
        if module is bench_swiglu:
            N, F = shape
            return [Case("tiny", [torch.randn(N, 2 * F, dtype=dtype).requires_grad_()], [torch.randn(N, F)], 1, 1)]
        B, T, H, D = shape
        q, k = (torch.randn(B, T, H, D, dtype=dtype).requires_grad_() for _ in range(2))
        qw, kw = (torch.ones(D, requires_grad=True) for _ in range(2))
        ang = torch.rand(T, D // 2)
        return [Case("tiny", [q, k, qw, kw, ang.cos(), ang.sin()], [torch.randn(B, T, H, D)] * 2, 1, 1)]
    return cases


@EXT_ONLY
@pytest.mark.parametrize("module,shape,name", [(bench_rmsnorm, (8, 32), "bench_rmsnorm"),
                                               (bench_swiglu, (8, 16), "bench_swiglu"),
                                               (bench_rope, (1, 4, 2, 8), "bench_rope")])
def test_membound_harness_writes_csv_and_markdown(module, shape, name, tmp_path, monkeypatch):
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    monkeypatch.setattr(bench.common, "copy_bandwidth_gbs", lambda device: 10.0)
    monkeypatch.setattr(sys.modules["bench.membound"], "copy_bandwidth_gbs", lambda device: 10.0)
    fwd = {bench_rmsnorm: "fused_add_rmsnorm", bench_swiglu: "swiglu", bench_rope: "qk_rmsnorm_rope"}[module]
    ref = getattr(module, {"fused_add_rmsnorm": "fused_add_rmsnorm_ref", "swiglu": "swiglu_ref",
                           "qk_rmsnorm_rope": "qk_rmsnorm_rope_ref"}[fwd])
    ext = getattr(module, f"{fwd}_ext")
    rows = run(fwd, name, tiny_cases(module, shape), ref, ext, argv=["--device", "cpu", "--reps", "1"])
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in ("ext", "eager", "compile")
                                                          for m in ("fwd", "bwd", "fwd+bwd")}
    folders = list(tmp_path.iterdir())
    assert len(folders) == 1  # one folder per device name
    with open(folders[0] / f"{name}.csv") as f:
        table = list(csv.DictReader(f))
    assert set(table[0]) == MEMBOUND_COLUMNS and len(table) == 9
    assert all(float(r["ms"]) > 0 for r in table)
    assert (folders[0] / f"{name}.md").read_text().startswith(f"### {name} on ")


def test_train_step_benchmark_runs_each_provider(tmp_path, monkeypatch):
    from bench import bench_train_step

    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    tiny_model = ["--model.width=32", "--model.depth=1", "--model.heads=2", "--model.kv_heads=1",
                  "--model.align_layer=1", "--model.projector_hidden=16", "--train.batch_size=8",
                  "--phases.pool_size=8", "--phases.refill_count=8", "--phases.sampler_steps=2"]
    # reference+compile is left out here (inductor compiles for ~1 min on 2 cores); the compiled step
    # itself is tested in test_trainer.py::test_compiled_step_matches_eager
    rows = bench_train_step.main(["--device", "cpu", "--steps", "1", "--warmup", "1", "--providers",
                                  "reference,fused,fused+cuda_graphs", *tiny_model])
    measured = {r["provider"]: r for r in rows if r["ms_per_step"] is not None}
    assert set(measured) == {"reference", "fused"} and measured["reference"]["x_reference"] == 1.0
    (graphs,) = [r for r in rows if r["ms_per_step"] is None]  # CUDA only: a row that says so
    assert graphs["provider"] == "fused+cuda_graphs" and graphs["note"] == "needs a CUDA device"
    assert (next(tmp_path.iterdir()) / "bench_train_step.csv").exists()


@EXT_ONLY
def test_bench_command_runs_a_benchmark_and_writes_the_summary(tmp_path):
    """`unigendet bench` runs bench.bench_rope in its own process and collects CSV, markdown, PNG."""
    from unigendet.cli import main

    assert main(["bench", "--ops", "rope", "--device", "cpu", "--out", str(tmp_path)]) == 0
    (folder,) = list(tmp_path.iterdir())
    assert {p.name for p in folder.iterdir()} >= {"bench_rope.csv", "bench_rope.md", "bench_rope.png", "summary.md"}
    assert (folder / "summary.md").read_text() == (folder / "bench_rope.md").read_text()
    assert main(["bench", "--ops", "nope"]) == 2


def test_ceilings_report_copy_bandwidth_and_matmul_rate():
    from bench import ceilings

    rows = ceilings.main(["--device", "cpu", "--no-save"])
    assert [r["ceiling"] for r in rows] == ["copy bandwidth", "matmul"] and all(r["value"] > 0 for r in rows)


def test_data_benchmark_compares_both_loaders():
    from bench import bench_data
    from unigendet.data.loaders.dali import dali_reason

    if dali_reason() is not None:
        pytest.skip(dali_reason())
    rows = bench_data.main(["--device", "cpu", "--sizes", "32", "--batches", "2", "--warmup", "1", "--rounds", "1",
                            "--batch-size", "8", "--no-save"])
    assert [r["provider"] for r in rows] == ["pil", "dali"] and all(r["images_per_s"] > 0 for r in rows)
    assert rows[0]["data"] == "demo"


def test_data_benchmark_synthetic_jpegs(tmp_path):
    """--synthetic N writes N decodable JPEGs of --source-size pixels as a folder dataset of real images."""
    from PIL import Image

    from bench import bench_data
    from unigendet.data import build_loader

    root = bench_data.write_synthetic_jpegs(tmp_path / "syn", 20, 48)
    files = sorted((root / "real").iterdir())
    assert len(files) == 20 and all(Image.open(f).size == (48, 48) for f in files)
    assert files[0].read_bytes() != files[1].read_bytes()
    batch = next(iter(build_loader(root, 32, 8, seed=0, num_workers=0, loader="pil")))
    assert batch.images.shape == (8, 3, 32, 32) and batch.is_fake.sum() == 0
