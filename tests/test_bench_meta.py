"""``colabx bench meta --quick`` (run in CI): every row timed, the amortised costs and overheads
derived from those timings as documented."""

from __future__ import annotations

import json
import math

import pytest
import torch

from colabx.cli import main


def test_bench_meta_quick_times_every_row(tmp_path, capsys):
    out = tmp_path / "meta.json"
    assert main(["bench", "meta", "--quick", "--min-time", "0", "--period", "4", "--out",
                 str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["setup"]["difference"] == "one_sided"  # auto, without autocast
    assert data["setup"]["amp"] == "none"  # auto: as colabx train, none on the CPU
    ms = {k: v["median_ms"] for k, v in data["timings"].items()}
    assert set(ms) == {"vanilla", "colab plain", "colab meta (reference order)",
                       "colab meta (shared order)", "colab meta (published iteration)",
                       "restructured PyTorch", "reference-style PyTorch"}
    assert {r["implementation"] for r in data["rows"]} == set(ms) - {"vanilla", "colab plain"}
    assert all(math.isfinite(v) and v > 0 for v in ms.values())
    for row in data["rows"]:
        meta = ms[row["implementation"]]
        assert row["meta_part_ms"] == pytest.approx(meta - ms["colab plain"])
        assert row["period_4_ms"] == pytest.approx((3 * ms["colab plain"] + meta) / 4)
        assert row["period_1_overhead_pct"] == pytest.approx(100 * (meta / ms["vanilla"] - 1))
    text = capsys.readouterr().out
    assert "| colab meta (shared order) |" in text and "period 4" in text
    assert "faster than the published iteration (reference order, central difference)" in text


def test_bench_meta_central_times_no_separate_published_row(tmp_path):
    """With the central difference the reference-order row is the published iteration."""
    out = tmp_path / "meta.json"
    assert main(["bench", "meta", "--quick", "--min-time", "0", "--difference", "central",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["setup"]["difference"] == "central"
    assert "colab meta (published iteration)" not in data["timings"]
    assert len(data["rows"]) == 4


@pytest.mark.slow  # bf16 convolutions on the CPU: ~45 s on 2 cores
def test_bench_meta_quick_under_autocast(tmp_path):
    """``--amp bf16``: every row still runs (the meta step's θ± passes stay fp32 inside)."""
    out = tmp_path / "meta.json"
    assert main(["bench", "meta", "--quick", "--min-time", "0", "--amp", "bf16", "--out",
                 str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["setup"]["amp"] == "bf16"
    assert all(math.isfinite(v["median_ms"]) for v in data["timings"].values())


@pytest.mark.slow  # compiles five networks' iterations: ~40 s on 2 cores
def test_bench_meta_quick_compiled(tmp_path):
    """``--compile default``: colabx's rows run compiled networks, every row still times."""
    from torch._dynamo.utils import counters

    out = tmp_path / "meta.json"
    torch._dynamo.reset()  # graphs compiled by earlier tests of the process would be reused
    counters.clear()
    assert main(["bench", "meta", "--quick", "--min-time", "0", "--compile", "default",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["setup"]["compile"] == "default"
    assert all(math.isfinite(v["median_ms"]) for v in data["timings"].values())
    assert counters["stats"]["unique_graphs"] >= 5  # vanilla's f; f and g in both orders


def test_bench_meta_refuses_one_sided_under_autocast():
    """The one-sided difference needs the inner forward in fp32."""
    with pytest.raises(SystemExit):
        main(["bench", "meta", "--quick", "--amp", "bf16", "--difference", "one_sided"])


def test_bench_meta_meta_amp(tmp_path, capsys):
    """``--meta-amp bf16``: the generator and L_ROI passes of colabx's rows under CPU bf16
    autocast, the one-sided difference kept (the network's passes stay fp32); bf16 beside fp16
    autocast is refused."""
    out = tmp_path / "meta.json"
    assert main(["bench", "meta", "--quick", "--min-time", "0", "--rounds", "1", "--meta-amp",
                 "bf16", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert (data["setup"]["meta_amp"], data["setup"]["difference"]) == ("bf16", "one_sided")
    assert "meta passes bf16" in capsys.readouterr().out
    assert all(math.isfinite(v["median_ms"]) for v in data["timings"].values())
    with pytest.raises(SystemExit):
        main(["bench", "meta", "--quick", "--amp", "fp16", "--meta-amp", "bf16"])


def test_amp_auto_resolves_as_colabx_train():
    """``--amp auto`` (bench meta's default, and train's) is bf16 on CUDA, none on the CPU."""
    import torch

    from colabx._precision import resolve_amp

    assert resolve_amp("auto", torch.device("cuda", 1)) == "bf16"
    assert resolve_amp("auto", torch.device("cpu")) == "none"
    assert resolve_amp("fp16", torch.device("cuda")) == "fp16"


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_bench_meta_refuses_compile_modes_with_cuda_graphs(mode, capsys):
    """As colabx train refuses them for CoLab: graph replays overwrite what the meta step
    holds across passes."""
    with pytest.raises(SystemExit) as e:
        main(["bench", "meta", "--quick", "--compile", mode])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_bench_meta_profile_names_where_each_rows_time_goes(tmp_path, capsys):
    out = tmp_path / "meta.json"
    assert main(["bench", "meta", "--quick", "--min-time", "0", "--rounds", "1", "--profile",
                 "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["profile"]) == set(data["timings"])
    for row in data["profile"].values():
        assert row["wall_ms"] > 0 and row["device_ms"] is None  # no kernel time on the CPU
        assert 0 < len(row["top"]) <= 8 and all(t["self_ms"] >= 0 for t in row["top"])
        assert [t["self_ms"] for t in row["top"]] == sorted((t["self_ms"] for t in row["top"]),
                                                            reverse=True)
        # the network's convolutions are where a training iteration spends its time
        assert any("conv" in t["op"] for t in row["top"])
    text = capsys.readouterr().out
    assert "| profile (1 calls per row) | wall ms | most time per call |" in text
    with pytest.raises(SystemExit):
        main(["bench", "meta", "--quick", "--profile", "-1"])


@pytest.mark.parametrize("flag,want", [([], True), (["--fd-tf32"], True),
                                       (["--no-fd-tf32"], False)])
def test_bench_meta_fd_tf32_reaches_colabx_meta_steps(tmp_path, monkeypatch, flag, want):
    """As colabx train: TF32 θ± by default, ``--no-fd-tf32`` for strict fp32; the setting goes
    into every colabx MetaStep of the run (the pure-PyTorch rows have no such option) and into
    the JSON."""
    import colabx.bench.meta as bench_meta

    configs = []
    real = bench_meta.MetaStep

    def spy(f, g, config, *a, **kw):
        configs.append(config)
        return real(f, g, config, *a, **kw)

    monkeypatch.setattr(bench_meta, "MetaStep", spy)
    out = tmp_path / "meta.json"
    assert main(["bench", "meta", "--quick", "--min-time", "0", "--rounds", "1", *flag,
                 "--out", str(out)]) == 0
    assert len(configs) == 3 and all(c.fd_tf32 is want for c in configs)
    assert json.loads(out.read_text())["setup"]["fd_tf32"] is want


@pytest.mark.parametrize("extra", [[], ["--device", "cuda", "--compile", "default"]])
def test_bench_meta_cuda_graphs_needs_cuda_without_compile(extra, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # refused before any use
    with pytest.raises(SystemExit):
        main(["bench", "meta", "--quick", "--cuda-graphs", *extra])
    assert "--cuda-graphs needs --device cuda and no --compile" in capsys.readouterr().err
