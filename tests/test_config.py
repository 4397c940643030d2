"""Config: TOML files, overrides, validation errors that name the key and file, saved config round trip."""
import pytest

from unigendet.config import ConfigError, describe, dumps, load_config, save_config, to_dict


def test_builtin_configs_load():
    tiny = load_config("tiny_cpu")
    assert tiny.model.image_size == tiny.data.image_size == 32
    gpu = load_config("small_gpu")
    assert gpu.train.device == "cuda" and gpu.model.image_size == 64


def test_overrides_types_and_forms():
    cfg = load_config("tiny_cpu", ["--train.steps=7", "--model.g2d=false", "--optim.betas=[0.8, 0.9]",
                                   "--loss.w_auth", "0.25", "--phases.mode=joint"])
    assert cfg.train.steps == 7 and cfg.model.g2d is False and cfg.optim.betas == (0.8, 0.9)
    assert cfg.loss.w_auth == 0.25 and cfg.phases.mode == "joint"


@pytest.mark.parametrize("override,match", [
    ("--train.stepz=3", r"unknown key train.stepz; did you mean train.steps"),
    ("--trian.steps=3", r"unknown section \[trian\]"),
    ("--train.steps=three", r"command line: train.steps: expected an integer"),
    ("--model.g2d=maybe", r"model.g2d: expected true or false"),
    ("--phases.mode=both", r"phases.mode = 'both' is not one of"),
    ("--ops.backend=cuda", r"ops.backend = 'cuda' is not one of \('auto', 'triton', 'ext', 'sdpa', 'reference'\)"),
    ("--model.kv_heads=3", r"model.heads 4 is not a multiple of model.kv_heads 3"),
    ("--data.image_size=30", r"image size 30 is not a multiple of model.patch_size 4"),
    ("--model.align_layer=9", r"model.align_layer 9"),
    ("train.steps=3", r"expected --section.key=value"),
    ("--train.ddp_bucket_mb=0", r"command line: train.ddp_bucket_mb must be a finite number > 0"),
    ("--train.fsdp_param_dtype=float16", r"train.fsdp_param_dtype = 'float16' is not one of"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny_cpu", [override])


def test_bad_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = 5\nbatchsize = 3\n")
    with pytest.raises(ConfigError, match=rf"{bad}: unknown key train.batchsize; did you mean train.batch_size"):
        load_config(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nsteps = 5\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="no config named 'nope'"):
        load_config("nope")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("tiny_cpu", ["--train.steps=11", "--model.experts=shared"])
    path = tmp_path / "config.toml"
    path.write_text(dumps(cfg))
    assert to_dict(load_config(path)) == to_dict(cfg)


def test_every_field_is_documented():
    text = describe()
    for section, table in to_dict(load_config("tiny_cpu")).items():
        for key in table:
            entry = text.split(f"  {key} = ", 1)
            assert len(entry) == 2, f"{section}.{key} missing from describe()"
            doc = entry[1].split("\n", 2)[1].strip()
            assert doc, f"{section}.{key} has no docstring"


def test_data_quarantine_key(tmp_path):
    assert load_config("tiny_cpu").data.quarantine == ""  # '' = DATA_ROOT/.unigendet_quarantine.tsv if present
    cfg = load_config("tiny_cpu", [f"--data.quarantine={tmp_path / 'bad.tsv'}"])
    assert cfg.data.quarantine == str(tmp_path / "bad.tsv")
    assert "quarantine = ''" in describe() and "unigendet data check" in describe()


@pytest.mark.parametrize("override,match", [
    ("--eval.timestep_shift=0", r"^command line: eval.timestep_shift must be a finite number > 0, got 0.0"),
    ("--eval.timestep_shift=-2", r"eval.timestep_shift must be a finite number > 0"),
    ("--eval.timestep_shift=nan", r"eval.timestep_shift must be a finite number > 0, got nan"),
    ("--eval.timestep_shift=inf", r"eval.timestep_shift must be a finite number > 0, got inf"),
    ("--eval.timestep_shift=three", r"eval.timestep_shift: expected a number"),
    ("--optim.eps=0", r"optim.eps must be a finite number > 0"),
    ("--optim.eps=nan", r"optim.eps must be a finite number > 0"),
    ("--model.projector_act=relu", r"model.projector_act = 'relu' is not one of \('silu', 'gelu'\)"),
    ("--model.projector_hidden=-1", r"model.projector_hidden must be >= 0"),
])
def test_sampler_optimizer_and_projector_keys_are_checked(override, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config("tiny_cpu", [override])
    assert "\n" not in str(info.value)


def test_new_keys_default_to_the_old_behaviour():
    cfg = load_config("tiny_cpu")
    assert (cfg.eval.timestep_shift, cfg.optim.eps) == (1.0, 1e-8)  # 1e-8 = torch's AdamW default
    assert (cfg.model.projector_act, cfg.model.projector_hidden) == ("silu", 256)
    ok = load_config("tiny_cpu", ["--eval.timestep_shift=0.5", "--optim.eps=1e-15", "--model.projector_hidden=0"])
    assert (ok.eval.timestep_shift, ok.optim.eps, ok.model.projector_hidden) == (0.5, 1e-15, 0)


def test_published_presets(tmp_path):
    one, two = load_config("published"), load_config("published_stage2")
    assert (one.phases.mode, two.phases.mode) == ("joint", "diga")
    assert (one.optim.ema_decay, two.optim.ema_decay) == (0.99, 0.95)
    assert two.train.init_from == ""  # for the user to set to the stage I run
    assert one.model == two.model  # stage II loads stage I's weights: the same model
    for cfg in (one, two):
        o, m, e = cfg.optim, cfg.model, cfg.eval
        assert (o.schedule, o.warmup_steps, o.weight_decay, o.eps) == ("constant", 2000, 0.0, 1e-15)
        assert (m.projector_act, m.projector_hidden) == ("gelu", 0)  # 0 = 4 * width
        assert m.align_layer == max(1, round(8 * m.depth / 28))  # layer 8 of 28, at this depth
        assert (e.timestep_shift, e.sampler_steps) == (3.0, 50)
        assert (m.width, m.depth, m.image_size, cfg.train.device) == (512, 12, 64, "cuda")
        path = tmp_path / "saved.toml"
        save_config(cfg, path)
        assert load_config(path) == cfg


def test_shared_experts_refused_in_diga():
    """Stage II freezes the detector; with shared experts no block weight would train: refused,
    naming both keys. The other modes accept shared experts."""
    with pytest.raises(ConfigError, match=r"phases\.mode = 'diga'.*model\.experts = 'shared'"):
        load_config("tiny_cpu", ["--phases.mode=diga", "--model.experts=shared"])
    for mode in ("joint", "alternate"):
        load_config("tiny_cpu", [f"--phases.mode={mode}", "--model.experts=shared"])
    load_config("tiny_cpu", ["--phases.mode=diga", "--model.experts=mot"])


def test_closed_choices_come_from_the_field_types():
    """A field typed with a Literal (ops.backend, phases.mode) takes its allowed values from it, the ones
    the backends and the phase table define; `--help-config` lists them."""
    import typing
    from dataclasses import fields

    from unigendet import backends, phase_modes
    from unigendet.config import CHOICES, Config, _field_types, config_from_dict

    literal = {}
    for sec in fields(Config):
        for key, typ in _field_types(sec.default_factory).items():
            if typing.get_origin(typ) is typing.Literal:
                literal[(sec.name, key)] = typing.get_args(typ)
    assert literal[("phases", "mode")] == phase_modes.PHASE_MODES
    assert literal[("ops", "backend")] == backends.BACKEND_CHOICES
    assert all(CHOICES[key] == values for key, values in literal.items())
    assert backends.BACKEND_CHOICES == ("auto", *backends.BACKEND_NAMES)
    assert "backend = 'auto'  (one of: auto, triton, ext, sdpa, reference)" in describe()
    for name in backends.BACKEND_CHOICES:
        assert load_config("tiny_cpu", [f"--ops.backend={name}"]).ops.backend == name
    with pytest.raises(ConfigError, match=r"^cfg.toml: ops.backend: expected a string, got 3$"):
        config_from_dict({"ops": {"backend": 3}}, "cfg.toml")
