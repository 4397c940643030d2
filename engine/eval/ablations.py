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
from .evaluate import evaluate

ABLATIONS: dict[str, list[str]] = {
    "full": [],
    "no_mmsa": ["--model.g2d=false", "--model.d2g=false"],
    "published_mmsa": ["--model.g2d=false", "--model.d2g=true"],
    "no_diga": ["--loss.lambda_dig=0"],
    "align_only": ["--loss.w_auth=0"],
    "auth_only": ["--loss.w_align=0"],
    "separate": ["--model.g2d=false", "--model.d2g=false", "--loss.lambda_dig=0"],
}
COLUMNS = ("det_auc", "fid", "kid", "samples_per_s")


def run_ablations(config: str, overrides: list[str], out_dir: str | Path, seeds: list[int], *,
                  variants: list[str] | None = None, data_dir: str | None = None, runs_dir: str | Path | None = None,
                  log=print) -> dict:
    """Train + evaluate every variant for every seed (reusing finished rows, module docstring); write
    ablations.{json,md} into out_dir. Run folders go to runs_dir (default out_dir)."""
    from ..train import Trainer

    out_dir = Path(out_dir)
    runs_dir = Path(runs_dir) if runs_dir is not None else out_dir
    names = variants or list(ABLATIONS)
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise ConfigError(f"unknown ablation variant(s) {unknown}; choose from {list(ABLATIONS)}")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for seed in seeds:
        for name in names:
            row_file = out_dir / "rows" / f"{name}_seed{seed}.json"
            key = {"config": config, "overrides": overrides, "data": data_dir}
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
            metrics = evaluate(run_dir, data_dir or cfg.eval.data, run_dir, log=log)
            row = {"seed": seed, "samples_per_s": trained.get("samples_per_s", float("nan")),
                   **{k: metrics[k] for k in COLUMNS if k in metrics}}
            runs[name].append(row)
            row_file.parent.mkdir(parents=True, exist_ok=True)
            row_file.write_text(json.dumps({"key": key, "row": row}, indent=1) + "\n")
    summary = {name: summarise(rows) for name, rows in runs.items()}
    result = {"config": config, "overrides": overrides, "seeds": seeds, "runs": runs, "summary": summary}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablations.json").write_text(json.dumps(result, indent=2))
    (out_dir / "ablations.md").write_text(render_table(result))
    return result


def summarise(rows: list[dict]) -> dict:
    """{column: (mean, std over seeds)} (std 0 for one seed)."""
    out = {}
    for col in COLUMNS:
        values = [r[col] for r in rows if col in r]
        if values:
            out[col] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def render_table(result: dict) -> str:
    lines = [f"# Ablations of `{result['config']}` (seeds {result['seeds']}; mean ± std over seeds)", "",
             f"Overrides: `{' '.join(result['overrides']) or 'none'}`", "",
             "| variant | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name, cols in result["summary"].items():
        cells = [f"{cols[c][0]:.4g} ± {cols[c][1]:.2g}" if c in cols else "" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
