"""The configuration tree: TOML in, `--section.key=value` overrides, validation, saving (the section
dataclasses themselves are in `unigendet.config_schema`, re-exported here).

One dataclass per section (data, model, loss, phases, optim, train, eval, ops). Every field has a
docstring (the string literal right below it), which `unigendet train --help-config` prints. A config
is built in three steps, each of which names the offending file / key / value when it fails:

    cfg = load_config("tiny_cpu")                       # a name in engine/configs/ or a path
    cfg = load_config("tiny_cpu", ["--train.steps=10"])  # with command-line overrides
    save_config(cfg, "run/config.toml")                  # the resolved config, saved with every run

Every numeric field declares its allowed range right beside it (`num(default, ge=..., gt=..., le=...,
lt=...)`, kept in the field's metadata); `validate()` checks them all, and more: a float must be
finite, an int must fit in int64. Errors are one line and blame where the value came from: the
config file, or "command line" for a `--section.key=value` override.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import tomllib
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from .config_schema import (  # the schema's names are part of this module's API  # noqa: F401
    CHOICES, INT64_MAX, INT64_MIN, AugmentConfig, Config, ConfigError, DataConfig, EvalConfig, LossConfig, ModelConfig,
    OpsConfig, OptimConfig, PhasesConfig, TrainConfig, describe, field_docs, num)
from .phase_modes import PHASE_MODES, mode_trains_shared, schedule

CONFIG_DIR = Path(__file__).parent / "configs"


# ----------------------------------------------------------------------------- parsing


def _show(value: Any) -> str:
    """repr of a value for a one-line message: newlines escaped, cut when long, safe for huge ints."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's int-to-str limit (alone or inside a list)
        text = f"<{type(value).__name__} too large to print>"
    return text if len(text) <= 80 else text[:77] + "..."


def _name(text: str) -> str:
    """A section / key name as given, quoted when it is not a plain identifier (one-line messages)."""
    return text if isinstance(text, str) and text.isidentifier() else _show(text)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a TOML / command-line value to the field's type, or raise ConfigError naming `where`."""
    origin = typing.get_origin(typ)
    if origin is typing.Literal:  # a closed set of names: typed like them here, validate() checks which
        return _coerce(value, type(typing.get_args(typ)[0]), where)
    if origin is types.UnionType:  # e.g. `tuple[int, ...] | str`: the first member that takes the value
        errors = []
        for member in typing.get_args(typ):
            try:
                return _coerce(value, member, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is tuple:
        args = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.strip("[]() ").split(",") if v.strip()]
        if len(args) == 2 and args[1] is Ellipsis:  # variable length: tuple[int, ...]
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where}: expected a list, got {_show(value)}")
            return tuple(_coerce(v, args[0], where) for v in value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {_show(value)}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {_show(value)}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected an integer, got {_show(value)}") from None
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {_show(value)}")
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond the float range
            raise ConfigError(f"{where}: expected a number, got {_show(value)}") from None
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_show(value)}")
        return value
    raise ConfigError(f"{where}: unsupported field type {typ!r}")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """{field: its type} of a section dataclass, the postponed annotations resolved."""
    return typing.get_type_hints(cls)


def _apply(cfg: Config, section: str, key: str, value: Any, source: str, origins: dict | None = None) -> None:
    sections = {f.name: f for f in fields(Config)}
    if section not in sections:
        raise ConfigError(f"{source}: unknown section [{_name(section)}] (sections: {', '.join(sections)})")
    sub = getattr(cfg, section)
    types = _field_types(type(sub))
    if key not in types:
        import difflib

        hint = difflib.get_close_matches(key, types, n=1) if isinstance(key, str) else []
        extra = f"; did you mean {section}.{hint[0]}?" if hint else ""
        raise ConfigError(f"{source}: unknown key {section}.{_name(key)}{extra}")
    setattr(sub, key, _coerce(value, types[key], f"{source}: {section}.{key}"))
    if origins is not None:
        origins[f"{section}.{key}"] = source


def _resolve_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    builtin = CONFIG_DIR / f"{name_or_path}.toml"
    if builtin.is_file():
        return builtin
    names = sorted(q.stem for q in CONFIG_DIR.glob("*.toml"))
    raise ConfigError(f"no config named {name_or_path!r}: not a file, and not one of {names}")


def parse_overrides(args: list[str]) -> list[tuple[str, str, str]]:
    """`--section.key=value` (or `--section.key value`) -> [(section, key, value)]."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise ConfigError(f"override {_show(arg)}: expected --section.key=value")
        if "=" in arg:
            name, value = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            name, value = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {_show(arg)}: missing value")
        section, key = name.split(".", 1)
        out.append((section, key, value))
        i += 1
    return out


def load_config(name_or_path: str | Path = "tiny_cpu", overrides: list[str] | None = None) -> Config:
    """Read a TOML config (a name in engine/configs/ or a path), apply overrides, validate."""
    path = _resolve_path(name_or_path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); a TOML file must be UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        raw = tomllib.loads(text)
    except (ValueError, RecursionError) as e:  # TOMLDecodeError, or an integer too long to convert
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{path}: not valid TOML: {detail}") from None
    return config_from_dict(raw, str(path), overrides)


def config_from_dict(raw: dict, source: str = "<dict>", overrides: list[str] | None = None) -> Config:
    cfg = Config()
    origins: dict[str, str] = {}  # "section.key" -> where its value came from (file or command line)
    for section, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: top-level key {_name(section)} must be a [section] table")
        for key, value in table.items():
            _apply(cfg, section, key, value, source, origins)
    for section, key, value in parse_overrides(overrides or []):
        _apply(cfg, section, key, value, "command line", origins)
    validate(cfg, source, origins)
    return cfg


class _Blame:
    """Where the values of some keys came from: the config file, "command line", or both."""

    ALIASES = {"model.image_size": "data.image_size"}  # validate() copies data.image_size into the model

    def __init__(self, source: str, origins: dict[str, str] | None = None):
        self.source, self.origins = source, origins or {}

    def __call__(self, *keys: str) -> str:
        found = []
        for key in keys:
            where = self.origins.get(self.ALIASES.get(key, key), self.source)
            if where not in found:
                found.append(where)
        return " + ".join(found) or self.source


def _range_text(bounds: dict) -> str:
    lo = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    hi = (bounds["le"], "]") if "le" in bounds else (bounds["lt"], ")") if "lt" in bounds else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]}, {hi[0]}{hi[1]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1]}"
    if hi:
        return f"{'<=' if hi[1] == ']' else '<'} {hi[0]}"
    return ""


def _out_of_range(value: Any, bounds: dict) -> str:
    """'' when `value` is allowed by `bounds` (a float must be finite, an int fit int64), else why not."""
    text = _range_text(bounds)
    inside = (value >= bounds.get("ge", value) and value <= bounds.get("le", value)
              and ("gt" not in bounds or value > bounds["gt"]) and ("lt" not in bounds or value < bounds["lt"]))
    if isinstance(value, float):
        return "" if math.isfinite(value) and inside else f"must be a finite number {text}".rstrip()
    if isinstance(value, int) and not isinstance(value, bool):
        if not inside:
            return f"must be {text}"
        return "" if INT64_MIN <= value <= INT64_MAX else f"must fit in a 64-bit integer [{INT64_MIN}, {INT64_MAX}]"
    return f"must be a number {text}".rstrip()


def check_ranges(obj: Any, section: str, blame: Any = None) -> None:
    """Check every field of the section dataclass `obj` against the range declared beside it (`num`)."""
    blame = blame or _Blame("config")
    for f in fields(obj):
        bounds = f.metadata.get("range")
        if bounds is None:
            continue
        value = getattr(obj, f.name)
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for i, v in items:
            problem = _out_of_range(v, bounds)
            if problem:
                name = f"{section}.{f.name}" + (f"[{i}]" if i is not None else "")
                raise ConfigError(f"{blame(f'{section}.{f.name}')}: {name} {problem}, got {_show(v)}")


def validate(cfg: Config, source: str = "config", origins: dict[str, str] | None = None) -> None:
    """Check values and cross-field rules; raise ConfigError naming the key and where its value came
    from (`source`, or "command line" for keys `origins` says were overridden there)."""
    blame = _Blame(source, origins)
    m, d = cfg.model, cfg.data
    for sec in fields(Config):  # every declared range (num(...) beside each numeric field), first
        check_ranges(getattr(cfg, sec.name), sec.name, blame)
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{blame(f'{section}.{key}')}: {section}.{key} = {_show(value)} is not one of {allowed}")
    if cfg.eval.inception != "":
        raise ConfigError(f"{blame('eval.inception')}: eval.inception = {_show(cfg.eval.inception)}: a config no "
                          "longer chooses the Inception network (its code would run); remove the key and pass "
                          "`unigendet eval --inception PATH` instead")
    m.image_size = d.image_size  # the model is built for the images the loader makes
    if m.vae and not (m.latent_channels and m.latent_downsample):
        _resolve_vae_geometry(m, blame)
    check_model(m, source, blame)
    if cfg.loss.lambda_att > 0 and not (m.g2d and m.d2g and mmsa_layer_set(m)):
        raise ConfigError(f"{blame('loss.lambda_att', 'model.g2d', 'model.d2g', 'model.mmsa_layers')}: "
                          "loss.lambda_att > 0 needs model.g2d, model.d2g and at least one layer in "
                          f"model.mmsa_layers (L_MMSA compares the two cross directions of the MMSA layers); got "
                          f"g2d={m.g2d}, d2g={m.d2g}, mmsa_layers={_show(m.mmsa_layers)}")
    if m.experts == "shared" and not mode_trains_shared(cfg.phases.mode):
        owners = sorted(set().union(*(p.trainable for p in schedule(cfg.phases.mode))))
        others = " / ".join(repr(mode) for mode in PHASE_MODES if mode_trains_shared(mode))
        raise ConfigError(f"{blame('phases.mode', 'model.experts')}: phases.mode = {cfg.phases.mode!r} trains "
                          f"only {' and '.join(owners)}-owned weights (never the shared ones), but model.experts "
                          "= 'shared' gives both streams one set of block weights, so the stage would train no "
                          "block weight (only embeddings, heads and projector); use model.experts = 'mot', or "
                          f"phases.mode = {others}")
    for key in ("crop_scale", "blur_sigma", "jpeg_quality"):  # [min, max] ranges of the augmentations
        lo, hi = getattr(cfg.augment, key)
        if lo > hi:
            raise ConfigError(f"{blame(f'augment.{key}')}: augment.{key} = [{lo}, {hi}]: min exceeds max")
    if cfg.phases.refill_count > cfg.phases.pool_size:
        raise ConfigError(f"{blame('phases.refill_count', 'phases.pool_size')}: phases.refill_count "
                          f"({cfg.phases.refill_count}) exceeds phases.pool_size ({cfg.phases.pool_size})")
    age, every = cfg.phases.max_fake_age, cfg.phases.refill_every
    if age != 0 and age < every:
        raise ConfigError(f"{blame('phases.max_fake_age', 'phases.refill_every')}: phases.max_fake_age = {age} "
                          f"must be 0 (no limit) or >= phases.refill_every ({every}), so the fakes of the last "
                          "refill are always young enough to sample")


def check_model(m: ModelConfig, source: str = "ModelConfig", blame: Any = None) -> None:
    """Ranges and shape rules of the model (also called by UniGenDet for a ModelConfig built in code)."""
    b = blame or _Blame(source)
    check_ranges(m, "model", b)
    if m.experts not in ("mot", "shared"):
        raise ConfigError(f"{b('model.experts')}: model.experts = {_show(m.experts)} is not one of ('mot', 'shared')")
    if m.image_size % m.patch_size:
        raise ConfigError(f"{b('model.image_size', 'model.patch_size')}: image size {m.image_size} is not a "
                          f"multiple of model.patch_size {m.patch_size}")
    if m.width % m.heads:
        raise ConfigError(f"{b('model.width', 'model.heads')}: model.width {m.width} is not a multiple of "
                          f"model.heads {m.heads}")
    if m.heads % m.kv_heads:
        raise ConfigError(f"{b('model.heads', 'model.kv_heads')}: model.heads {m.heads} is not a multiple of "
                          f"model.kv_heads {m.kv_heads}")
    if (m.width // m.heads) % 4:
        raise ConfigError(f"{b('model.width', 'model.heads')}: head dim {m.width // m.heads} must be a multiple "
                          "of 4 (2-D axial RoPE)")
    if m.mlp_ratio * m.width < 1:
        raise ConfigError(f"{b('model.mlp_ratio', 'model.width')}: model.mlp_ratio * model.width = "
                          f"{m.mlp_ratio * m.width:g} must be >= 1 "
                          "(the SwiGLU hidden size, rounded to a multiple of 8)")
    if m.align_layer > m.depth:
        raise ConfigError(f"{b('model.align_layer', 'model.depth')}: model.align_layer {m.align_layer} must be in "
                          f"[1, model.depth={m.depth}]")
    layers = m.mmsa_layers
    where = b("model.mmsa_layers")
    if isinstance(layers, str):
        if layers not in ("all", "none"):
            raise ConfigError(f"{where}: model.mmsa_layers = {_show(layers)} must be 'all', 'none' or a list of "
                              "1-based layer indices")
    elif not isinstance(layers, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise ConfigError(f"{where}: model.mmsa_layers = {_show(layers)} must be 'all', 'none' or a list of integers")
    elif any(not 1 <= i <= m.depth for i in layers):
        raise ConfigError(f"{where}: model.mmsa_layers = {_show(list(layers))}: layer indices must be in "
                          f"[1, model.depth={m.depth}]")
    elif len(set(layers)) != len(layers):
        raise ConfigError(f"{where}: model.mmsa_layers = {_show(list(layers))} lists a layer twice")
    if m.projector_act not in ("silu", "gelu"):
        raise ConfigError(f"{b('model.projector_act')}: model.projector_act = {_show(m.projector_act)} is not one "
                          "of ('silu', 'gelu')")
    if m.vae:
        _check_latent_model(m, b)


def _resolve_vae_geometry(m: ModelConfig, blame: Any) -> None:
    """Fill model.latent_channels / latent_downsample (when 0) from the VAE folder's config.json."""
    from .vae import VAEError, read_vae_geometry

    try:
        channels, downsample = read_vae_geometry(m.vae)
    except VAEError as e:
        raise ConfigError(f"{blame('model.vae')}: model.vae: {e}") from None
    m.latent_channels = m.latent_channels or channels
    m.latent_downsample = m.latent_downsample or downsample


def _check_latent_model(m: ModelConfig, b: Any) -> None:
    """The latent path's shape rules: integer latent and token grids, no cross-stream reads."""
    if not (m.latent_channels and m.latent_downsample):
        raise ConfigError(f"{b('model.latent_channels', 'model.latent_downsample')}: with model.vae, "
                          "model.latent_channels and model.latent_downsample must be set (0 = read from the VAE, "
                          "which validate() does for a config file)")
    side = m.latent_downsample * m.latent_patch_size
    if m.image_size % side:
        raise ConfigError(f"{b('model.image_size', 'model.latent_patch_size', 'model.latent_downsample')}: image size "
                          f"{m.image_size} is not a multiple of the VAE's downsampling factor "
                          f"{m.latent_downsample} x model.latent_patch_size {m.latent_patch_size} = {side}, so the "
                          "latent grid does not split into whole patches")
    # g2d would need the detector's pixels of a noisy latent in every generation pass and sampler step
    # (a decode each); d2g reads the posterior means of the tested pixels (the published layout)
    if m.g2d:
        raise ConfigError(f"{b('model.vae', 'model.g2d')}: model.vae (latent generator) needs model.g2d = false: "
                          "the detector stream reads pixels, so a generation pass over a noisy latent has no "
                          "detector tokens to read (model.d2g, the published layout, is supported)")


def gen_grid(m: ModelConfig) -> int:
    """Side of the generator stream's token grid: (S / p) in pixel space, (S / f) / p_lat with model.vae."""
    if m.vae:
        return m.image_size // m.latent_downsample // m.latent_patch_size
    return m.image_size // m.patch_size


def mmsa_layer_set(m: ModelConfig) -> frozenset[int]:
    """The 1-based layers where MMSA joins the streams: model.mmsa_layers resolved ('all', 'none', list)."""
    if m.mmsa_layers == "all":
        return frozenset(range(1, m.depth + 1))
    return frozenset() if m.mmsa_layers == "none" else frozenset(m.mmsa_layers)


# ----------------------------------------------------------------------------- saving


def to_dict(cfg: Config) -> dict:
    out = {}
    for sec in fields(Config):
        values = dataclasses.asdict(getattr(cfg, sec.name))
        out[sec.name] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}
    return out


def dumps(cfg: Config) -> str:
    """The resolved config as TOML text (round-trips through load_config)."""
    import tomli_w

    return tomli_w.dumps(to_dict(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(dumps(cfg))
