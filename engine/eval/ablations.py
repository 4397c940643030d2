"""`unigendet eval --ablations`: train and evaluate the method's variants on the same budget.

Each variant is a set of config overrides on one base config; every variant is trained and
evaluated once per seed, and the table reports mean and spread over the seeds. The variants:

    full            UniGenDet as configured (bidirectional MMSA, DIGA alignment + authenticity)
    no_mmsa         g2d = d2g = false: the streams never attend to each other
    published_mmsa  g2d = false, d2g = true: the published code's layout
    no_diga         lambda_dig = 0
    align_only      DIGA alignment without the authenticity term
    auth_only       DIGA authenticity without the alignment term
    separate        no MMSA and no DIGA: with per-stream experts the generator and the detector
                    share no computation, i.e. two separate models trained side by side

and the generalisation switches ([augment], engine/train/detector_augment.py), against `full`:

    aug_crop        random zoom crop of the detector's inputs, p = 0.5
    aug_jitter      colour jitter, p = 0.5
    aug_blur        Gaussian blur, p = 0.5
    aug_jpeg        JPEG round trip, p = 0.5
    aug_all         all four, p = 0.3 each (about 3 rows in 4 get at least one)

`--variants` takes names or the sets `method` (the first seven, the default) and `generalisation`
(full and the aug_ variants). With cross-source sources (`--real` / `--real-sources` / `--fake`, as
for `unigendet eval`) each row also holds the false-positive rate of every real source (`fpr[NAME]`)
and the AUC of every (real, fake) pair (`auc[REAL|FAKE]`); the subfolders of a --real-sources
folder appear pooled, under the folder's name (each run's metrics.json has them one by one).

Each finished (variant, seed) run leaves its row in OUT/rows/VARIANT_seedK.json together with the
overrides it ran with; a later invocation with the same config and overrides reuses those rows
instead of training again. So a table too long for one sitting is built over several (e.g. one seed
at a time, OUT in a committed folder and the run folders, `runs_dir`, elsewhere).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..config import ConfigError, load_config
from .cross_source import CrossSourceSpec
from .evaluate import evaluate

ABLATIONS: dict[str, list[str]] = {
    "full": [],
    "no_mmsa": ["--model.g2d=false", "--model.d2g=false"],
    "published_mmsa": ["--model.g2d=false", "--model.d2g=true"],
    "no_diga": ["--loss.lambda_dig=0"],
    "align_only": ["--loss.w_auth=0"],
    "auth_only": ["--loss.w_align=0"],
    "separate": ["--model.g2d=false", "--model.d2g=false", "--loss.lambda_dig=0"],
    "aug_crop": ["--augment.crop_p=0.5"],
    "aug_jitter": ["--augment.jitter_p=0.5"],
    "aug_blur": ["--augment.blur_p=0.5"],
    "aug_jpeg": ["--augment.jpeg_p=0.5"],
    "aug_all": ["--augment.crop_p=0.3", "--augment.jitter_p=0.3", "--augment.blur_p=0.3", "--augment.jpeg_p=0.3"],
}
VARIANT_SETS = {
    "method": ["full", "no_mmsa", "published_mmsa", "no_diga", "align_only", "auth_only", "separate"],
    "generalisation": ["full", "aug_crop", "aug_jitter", "aug_blur", "aug_jpeg", "aug_all"],
}
COLUMNS = ("det_auc", "fid", "kid", "samples_per_s")


def expand_variants(names: list[str] | None) -> list[str]:
    """Variant names with the sets of VARIANT_SETS expanded, in order, each once (None = `method`)."""
    out: list[str] = []
    for name in names or ["method"]:
        for variant in VARIANT_SETS.get(name, [name]):
            if variant not in out:
                out.append(variant)
    unknown = [n for n in out if n not in ABLATIONS]
    if unknown:
        raise ConfigError(f"unknown ablation variant(s) {unknown}; choose from {list(ABLATIONS)} or the sets "
                          f"{list(VARIANT_SETS)}")
    return out


def cross_columns(metrics: dict, spec: CrossSourceSpec | None) -> dict:
    """The row's cross-source cells: fpr[REAL] and auc[REAL|FAKE], with --real-sources members pooled."""
    if spec is None or "cross_source" not in metrics:
        return {}
    cs = metrics["cross_source"]
    members = {m for group in spec.groups.values() for m in group}
    row = {f"fpr[{name}]": d["fpr"] for name, d in cs["real"].items() if name not in members}
    row.update({f"auc[{p['real']}|{p['fake']}]": p["auc"] for p in cs["pairs"] if p["real"] not in members})
    return row


def _key(config: str, overrides: list[str], data_dir: str | None, cross: CrossSourceSpec | None) -> dict:
    """What a finished row must have been run with to be reused (rows written without cross sources
    keep their key)."""
    key = {"config": config, "overrides": overrides, "data": data_dir}
    if cross is not None:
        key["cross"] = {"real": [[s.name, s.folder] for s in cross.real],
                        "fake": [[s.name, s.folder] for s in cross.fake], "groups": cross.groups}
    return key


def run_ablations(config: str, overrides: list[str], out_dir: str | Path, seeds: list[int], *,
                  variants: list[str] | None = None, data_dir: str | None = None, runs_dir: str | Path | None = None,
                  cross: CrossSourceSpec | None = None, log=print) -> dict:
    """Train + evaluate every variant for every seed (reusing finished rows, module docstring); write
    ablations.{json,md} into out_dir. Run folders go to runs_dir (default out_dir)."""
    from ..train import Trainer

    out_dir = Path(out_dir)
    runs_dir = Path(runs_dir) if runs_dir is not None else out_dir
    names = expand_variants(variants)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for seed in seeds:
        for name in names:
            row_file = out_dir / "rows" / f"{name}_seed{seed}.json"
            key = _key(config, overrides, data_dir, cross)
            done = json.loads(row_file.read_text()) if row_file.is_file() else None
            if done is not None and done.get("key") == key:
                log(f"ablation {name}, seed {seed}: reusing {row_file}")
                runs[name].append(done["row"])
                continue
            run_dir = runs_dir / f"{name}_seed{seed}"
            cfg = load_config(config, overrides + ABLATIONS[name] + [f"--train.seed={seed}",
                                                                     f"--train.out_dir={run_dir}"])
            log(f"ablation {name}, seed {seed}: training {cfg.train.steps} steps into {run_dir}")
            trained = Trainer(cfg, resume=True, log=log).train()
            metrics = evaluate(run_dir, data_dir or cfg.eval.data, run_dir, cross=cross, log=log)
            row = {"seed": seed, "samples_per_s": trained.get("samples_per_s", float("nan")),
                   **{k: metrics[k] for k in COLUMNS if k in metrics}, **cross_columns(metrics, cross)}
            runs[name].append(row)
            row_file.parent.mkdir(parents=True, exist_ok=True)
            row_file.write_text(json.dumps({"key": key, "row": row}, indent=1) + "\n")
    summary = {name: summarise(rows) for name, rows in runs.items()}
    result = {"config": config, "overrides": overrides, "seeds": seeds, "runs": runs, "summary": summary}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablations.json").write_text(json.dumps(result, indent=2))
    (out_dir / "ablations.md").write_text(render_table(result))
    return result


def table_columns(rows: list[dict]) -> list[str]:
    """COLUMNS, then the cross-source columns in the order the rows first hold them."""
    extra = [k for r in rows for k in r if k.startswith(("fpr[", "auc["))]
    return list(COLUMNS) + list(dict.fromkeys(extra))


def summarise(rows: list[dict]) -> dict:
    """{column: (mean, std over seeds)} (std 0 for one seed)."""
    out = {}
    for col in table_columns(rows):
        values = [r[col] for r in rows if col in r]
        if values:
            out[col] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def render_table(result: dict) -> str:
    columns = table_columns([row for rows in result["runs"].values() for row in rows])
    lines = [f"# Ablations of `{result['config']}` (seeds {result['seeds']}; mean ± std over seeds)", "",
             f"Overrides: `{' '.join(result['overrides']) or 'none'}`", "",
             "| variant | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, cols in result["summary"].items():
        cells = [f"{cols[c][0]:.4g} ± {cols[c][1]:.2g}" if c in cols else "" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
