"""Trainer configuration: YAML with a safe loader, errors naming the key, CLI flags for every
option."""

from __future__ import annotations

from dataclasses import fields

import pytest

from colabx.cli import _parser
from colabx.train.config import ConfigError, TrainConfig, from_mapping, load_config, save_config


def test_defaults_are_valid_and_roundtrip_yaml(tmp_path):
    cfg = TrainConfig(mode="manual", patch_size=[32, 32, 16], target_spacing=[1.5, 1.5, 3.0])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("key,value,match", [
    ("mode", "colabb", "mode: must be one of"),
    ("t", 0, "t: must be >= 1"),
    ("t", 2.5, "t: expected int"),
    ("lr", 0.0, "lr: must be > 0"),
    ("lr", float("nan"), "lr: expected a finite number"),
    ("val_fraction", 0.95, "val_fraction: must be <= 0.9"),
    ("patch_size", [32, 32], None),
    ("patch_size", [32, 2, 32], "patch_size: every size must be >= 4"),
    ("patch_size", [32, 32, 32, 32], "patch_size: 2 or 3 sizes"),
    ("augment", "yes", "augment: expected bool"),
    ("epochs", True, "epochs: expected int"),
    ("device", "tpu", "device: expected auto, cpu"),
    ("tau", 0.0, "tau: must be > 0"),
    ("manual_contexts", [0, 1], "manual_contexts: distinct context-map values >= 1"),
    ("manual_contexts", [1, 1], "manual_contexts: distinct context-map values >= 1"),
    ("manual_contexts", [], "manual_contexts: distinct context-map values >= 1"),
    ("manual_contexts", ["liver"], "manual_contexts: expected list"),
])
def test_bad_values_name_the_key(key, value, match):
    if match is None:
        assert from_mapping({key: value}).patch_size == value
        return
    with pytest.raises(ConfigError, match=match):
        from_mapping({key: value})


def test_colab_needs_two_contexts():
    with pytest.raises(ConfigError, match="t: mode 'colab' needs t >= 2"):
        TrainConfig(mode="colab", t=1)
    assert TrainConfig(mode="vanilla", t=1).t == 1


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate: unknown configuration key"):
        load_config(p)


def test_yaml_is_read_with_the_safe_loader(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochs: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(p)


def test_yaml_not_a_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(p)


def test_int_for_float_is_accepted():
    assert from_mapping({"lr": 1}).lr == 1.0


def test_help_documents_every_option():
    sub = _parser()._subparsers._group_actions[0].choices["train"]
    text = sub.format_help()
    for f in fields(TrainConfig):
        if f.name != "dataset":
            assert "--" + f.name.replace("_", "-") in text, f.name


def test_cli_flags_parse_to_config_types():
    ns = _parser().parse_args(["train", "--mode", "vanilla", "--patch-size", "32", "32", "16",
                               "--no-augment", "--lr", "0.02", "--epochs", "3"])
    flags = {k: v for k, v in vars(ns).items()
             if k not in {"command", "config", "out", "resume", "overwrite", "dataset"}}
    cfg = from_mapping(flags)
    assert (cfg.mode, cfg.patch_size, cfg.augment, cfg.lr, cfg.epochs) == \
        ("vanilla", [32, 32, 16], False, 0.02, 3)


def test_runs_saved_before_tf32_theta_pm_keep_strict_fp32():
    """A configuration saved before fd_tf32 existed meant strict-fp32 θ± forwards (the default
    until run 8): it resumes so; a saved value is kept."""
    from colabx.train.config import saved_options

    assert saved_options({"mode": "colab"})["fd_tf32"] is False
    assert saved_options({"mode": "colab", "fd_tf32": True})["fd_tf32"] is True
    assert TrainConfig().fd_tf32 is True


def test_saved_options_replace_retired_values():
    """Runs saved with the retired vmap θ± forwards resume on the sequential ones (same math)."""
    from colabx.train.config import saved_options

    assert saved_options({"theta_pm": "vmap"})["theta_pm"] == "sequential"
    assert saved_options({"theta_pm": "grouped"})["theta_pm"] == "grouped"
    with pytest.raises(ConfigError, match="theta_pm"):
        from_mapping({"theta_pm": "vmap"})


def test_meta_amp_resolves_against_amp():
    """``amp`` (default) follows the run's resolved --amp, as colabx did before the option;
    none and bf16 are taken as given; bf16 cannot share a meta step with fp16 autocast."""
    from colabx.train.config import resolved_meta_amp

    assert TrainConfig().meta_amp == "amp"
    for amp in ("none", "bf16", "fp16"):
        assert resolved_meta_amp(TrainConfig(), amp) == amp
        assert resolved_meta_amp(TrainConfig(meta_amp="none"), amp) == "none"
    assert resolved_meta_amp(TrainConfig(meta_amp="bf16"), "none") == "bf16"
    with pytest.raises(ConfigError, match="meta_amp: bf16 with amp fp16"):
        TrainConfig(meta_amp="bf16", amp="fp16")
    with pytest.raises(ConfigError, match="meta_amp: must be one of"):
        from_mapping({"meta_amp": "fp16"})


def test_options_that_would_do_nothing_are_named():
    """Multi-mode audit: flags that the chosen configuration never reads (``--t`` with manual
    contexts, meta-step flags in vanilla, ``--compile-mode`` without ``--compile``, ...) were
    silently ignored."""
    from colabx.train.config import unused_options

    def unused(given, **kw):
        return [m.split(" has no effect")[0] for m in unused_options([TrainConfig(**kw)], given)]

    assert unused(["t", "lr", "margin"], mode="manual") == ["--t"]
    assert unused(["t"], mode="kmeans") == [] and unused(["t"], mode="dilation") == ["--t"]
    assert unused(["manual_contexts"], mode="colab") == ["--manual-contexts"]
    meta = ["meta_period", "meta_order", "gen_lr", "meta_amp", "recompute_generator"]
    assert unused(meta, mode="vanilla") == [f"--{k.replace('_', '-')}" for k in meta]
    assert unused(meta, mode="colab") == []
    assert unused(["meta_difference", "fd_tf32", "theta_pm"], mode="colab",
                  meta_grad="exact") == ["--meta-difference", "--fd-tf32", "--theta-pm"]
    assert unused(["theta_pm"], mode="colab", meta_difference="one_sided") == ["--theta-pm"]
    assert unused(["theta_pm"], mode="colab") == []  # auto: central under mixed precision
    assert unused(["compile_mode"], compile_mode="max-autotune-no-cudagraphs") == \
        ["--compile-mode"]
    assert unused(["compile_mode"], compile=True) == []
    # compare: an option is used when any compared mode uses it
    cfgs = [TrainConfig(mode=m) for m in ("vanilla", "manual")]
    assert [m.split(" ")[0] for m in unused_options(cfgs, ["t", "meta_period"])] == \
        ["--t", "--meta-period"]
    cfgs.append(TrainConfig(mode="colab"))
    assert unused_options(cfgs, ["t", "meta_period"]) == []
    assert unused_options([TrainConfig(mode="manual")], ["t"]) == [
        "--t has no effect here: it is used by modes colab and kmeans (dilation has 2 "
        "contexts, manual its maps' classes) only"]


def test_compile_modes_with_cuda_graphs_refused_for_colab_only_and_old_runs_still_resume(
        tmp_path, capsys):
    """A CoLab run saved with compile_mode reduce-overhead or max-autotune (before they were
    refused) reads back as their modes without CUDA graphs, so it resumes; other modes keep
    them. compare takes them when no compared mode is colab."""
    from colabx.cli import main
    from colabx.train.config import saved_options

    saved = TrainConfig(mode="vanilla", compile=True, compile_mode="reduce-overhead").to_dict()
    for mode, old, now in (("colab", "reduce-overhead", "default"),
                           ("colab", "max-autotune", "max-autotune-no-cudagraphs"),
                           ("vanilla", "reduce-overhead", "reduce-overhead")):
        opts = saved_options({**saved, "mode": mode, "compile_mode": old})
        assert opts["compile_mode"] == now
        TrainConfig(**opts)
    base = ["compare", "--compile", "--compile-mode", "reduce-overhead", "--seeds", "0", "0",
            "--out", str(tmp_path / "c")]
    assert main([*base, "--modes", "vanilla", "dilation"]) == 2
    assert "seeds: expected distinct seeds" in capsys.readouterr().err  # past the options
    assert main([*base, "--modes", "vanilla", "colab"]) == 2
    assert "compile_mode: reduce-overhead captures CUDA graphs" in capsys.readouterr().err
