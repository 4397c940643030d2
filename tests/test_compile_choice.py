"""train.compile = auto: what it picks per device and run length, and how the config takes the key."""
import pytest

from unigendet import ConfigError, load_config
from unigendet.train.compile_choice import CPU_COMPILE_MIN_STEPS, compile_choice


def train(*overrides):
    return load_config("tiny_cpu", list(overrides)).train


def test_auto_compiles_long_cpu_runs_only():
    assert train().compile == "auto"
    short, why = compile_choice(train(), "cpu")
    assert not short and f"< {CPU_COMPILE_MIN_STEPS}" in why
    long, why = compile_choice(train(f"--train.steps={CPU_COMPILE_MIN_STEPS}"), "cpu")
    assert long and f">= {CPU_COMPILE_MIN_STEPS}" in why
    assert compile_choice(train(f"--train.steps={CPU_COMPILE_MIN_STEPS}"), "cuda")[0] is False
    graphs = train(f"--train.steps={CPU_COMPILE_MIN_STEPS}", "--train.cuda_graphs=true")
    assert compile_choice(graphs, "cuda") == (False, "auto: train.cuda_graphs is on (the two are alternatives)")


@pytest.mark.parametrize("value, expected", [("true", True), ("false", False), ("auto", "auto")])
def test_an_explicit_choice_wins(value, expected):
    cfg = train(f"--train.compile={value}")
    assert cfg.compile == expected
    if isinstance(expected, bool):
        assert compile_choice(cfg, "cpu") == (expected, f"train.compile = {value}")
        assert compile_choice(cfg, "cuda")[0] is expected


def test_other_values_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"train.compile = 'maybe' is not one of \('auto', True, False\)"):
        train("--train.compile=maybe")


def test_the_compile_cache_persists_in_the_users_cache_folder(monkeypatch, tmp_path):
    from unigendet.train.compile_choice import persistent_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert persistent_compile_cache() == str(tmp_path / "unigendet" / "torchinductor")
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    assert cache_dir() == str(tmp_path / "unigendet" / "torchinductor")  # where inductor now writes
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert persistent_compile_cache() == str(tmp_path / "mine")  # the user's choice stands
