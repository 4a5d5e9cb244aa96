"""Plumbing of `python -m benchmarks` on a tiny configuration (32x32, ngf 8, 2 rounds, no dvc, stub FID net).

Speeds are not asserted: only that every section runs and the results file has the keys and numbers
users read (finite, positive ratios and timings; memory and environment recorded).
"""
from __future__ import annotations

import json
import math

import torch

import pytest

from benchmarks.nets import Case
from benchmarks.runner import KEPT_HEAP_ENV, BenchConfig, preset, recipe_in_subprocess, run

REQUIRED = ("train_overhead_task3", "infer_overhead", "frechet_speedup", "frechet_rel_diff", "feature_speedup")


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_tiny_benchmark_writes_complete_results(tmp_path, capsys):
    out = tmp_path / "results" / "latest.json"
    run(preset("tiny"), torch.device("cpu"), out=out, workdir=tmp_path / "work")
    data = json.loads(out.read_text())
    printed = capsys.readouterr().out

    assert data["errors"] == {}
    for key in REQUIRED:
        assert key in data and key in printed
        assert _positive(data[key]) or (key == "frechet_rel_diff" and data[key] == 0), (key, data[key])
    assert data["frechet_rel_diff"] < 1e-6          # same value as pytorch-fid, even at 64-d
    assert data["train_overhead_task3_case"] == "resnet_9blocks@32"

    train = data["train"]["resnet_9blocks@32"]
    for name in ("plain", "task1", "task3"):
        t = train["timings"][name]
        assert len(t["samples_s"]) == t["repeats"] == 2 and all(_positive(s) for s in t["samples_s"])
        assert _positive(t["median_s"])
    assert train["trainable_params"]["task3"] < train["trainable_params"]["plain"]
    recipe = data["train_recipe"]["resnet_9blocks@32"]
    assert recipe["info"]["task3"]["recipe"] == "cyclegan" and _positive(recipe["ratios"]["task3"]["ratio"])
    assert recipe["info"]["reference"]["implementation"] == "benchmarks/reference.py"
    assert _positive(data["recipe_vs_reference_task3"]["resnet_9blocks@32"])
    assert "recipe_vs_reference_task3 resnet_9blocks@32 <= 0.80" in data["targets"]
    assert recipe["info"]["task3_unbatched"]["batch_calls"] is False
    assert set(recipe["timings"]) == {"reference", "plain", "task3"}            # the headline group
    assert set(recipe["lever_timings"]) == {"task3", "task3_unbatched"}           # the levers' own group
    assert _positive(data["recipe_levers_vs_default"]["resnet_9blocks@32"]["unbatched"])
    infer = data["infer"]["resnet_9blocks@32"]
    assert infer["max_abs_diff_vs_plain"] < 1e-5 and _positive(infer["ratios"]["materialized"]["ratio"])

    for name in ("train/resnet_9blocks@32/task3", "infer/resnet_9blocks@32/materialized"):
        assert _positive(data["memory"][name]["peak_rss_mib"])
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] >= 1 and env["date_utc"]
    isa = torch.backends.cpu.get_cpu_capability()                  # which EPYC generation the ratios are from
    assert env["cpu_generation"].startswith(isa) and f"({env['cpu_generation']})" in printed
    assert set(data["growth"]) == {f"{n}/lam={lam}" for n in ("resnet_9blocks", "unet_256") for lam in (0.125, 0.25, 0.5)}
    assert all(len(g["rows"]) == 10 for g in data["growth"].values())


def test_recipe_case_runs_in_a_fresh_process_under_the_given_heap(capsys):
    """The full and quick runs time each recipe case in its own interpreter (so a ratio does not depend on
    the cases before it), once as is and once with glibc keeping freed memory: the child's entry comes
    back, its progress is passed through, and the kept-heap child really ran under that environment."""
    cfg = BenchConfig(mode="quick", recipe_warmup=1, recipe_repeats=1, recipe_levers=("unbatched",), threads=1)
    case = Case("resnet_9blocks", 32, ngf=8)
    plain = recipe_in_subprocess(cfg, case, torch.device("cpu"), False)
    kept = recipe_in_subprocess(cfg, case, torch.device("cpu"), False, env=KEPT_HEAP_ENV, levers=False)
    printed = capsys.readouterr().out
    assert "resnet_9blocks@32 cyclegan round 1/1" in printed and "levers round 1/1" in printed
    assert plain["process"] == "fresh process" and plain["malloc_env"] == {k: None for k in KEPT_HEAP_ENV}
    assert kept["process"].startswith("fresh process, MALLOC_") and kept["malloc_env"] == KEPT_HEAP_ENV
    assert set(plain["timings"]) == {"reference", "plain", "task3"} and set(plain["levers"]) == {"unbatched"}
    assert kept["levers"] == {} and _positive(kept["vs_reference"]["task3"]["ratio"])


def test_a_failing_recipe_child_is_an_error_naming_the_case():
    cfg = BenchConfig(mode="quick", recipe_warmup=1, recipe_repeats=1, threads=1)
    with pytest.raises(RuntimeError, match=r"(?s)recipe case nosuchnet@32: exit 1: .*KeyError: .nosuchnet"):
        recipe_in_subprocess(cfg, Case("nosuchnet", 32, ngf=8), torch.device("cpu"), False)
