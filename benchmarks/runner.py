"""The benchmark run: configurations (full, quick, tiny), the sections, the summary and the table."""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from piggyback.layers import _PiggybackConvNd

from . import FORMAT_VERSION, LATEST
from .core import OtherLoad, configure_backend, environment, fmt_table, interleave, load_average, ratios, write_json
from .nets import Case

SECTIONS = ("train", "infer", "fid", "frechet", "pipeline", "memory", "growth")


@dataclass
class BenchConfig:
    mode: str
    train_cases: tuple = ()
    headline: str = ""                       # the train case reported as train_overhead_task3
    infer_headline: str = ""                 # the inference case reported as infer_overhead
    train_warmup: int = 1
    train_repeats: int = 5
    recipe_cases: tuple = ()                 # the full recipe (train_step with discriminators)
    recipe_levers: tuple = ()                # our recipe one lever away (nets.LEVERS), each against the default
    recipe_warmup: int = 2                   # glibc settles its heap (mmap threshold) over the first iterations
    recipe_repeats: int = 4
    recipe_process: str = "subprocess"       # subprocess (each case in a fresh interpreter) | inprocess (tests)
    recipe_kept_heap: bool = True            # also measure each case with glibc keeping freed memory (no levers)
    infer_cases: tuple = ()
    infer_warmup: int = 2
    infer_repeats: int = 10
    fid_images: int = 64
    fid_size: int = 128
    fid_batch: int = 50
    fid_warmup: int = 1
    fid_repeats: int = 2
    fid_stub: bool = False                   # a one-layer stand-in for the Inception (plumbing tests)
    frechet_dims: int = 2048
    frechet_samples: int = 4096
    frechet_ours_repeats: int = 5
    frechet_theirs_repeats: int = 3
    pipeline: tuple = ("tiny",)              # tiny | suite (params.yaml as is)
    noop_repeats: int = 3
    memory: str = "subprocess"               # subprocess | inprocess (approximate; tests) | off
    memory_steps: int = 2
    memory_fid: bool = True                  # also the FID feature and Fréchet cases (a minute on a CPU)
    growth_nets: tuple = ("resnet_9blocks", "unet_256")
    growth_lams: tuple = (0.125, 0.25, 0.5)
    growth_tasks: int = 10
    channels_last: str = "auto"              # auto (CUDA: on, CPU: off) | on | off
    threads: int | None = None               # CPU intra-op threads (default: one per available core)
    order: str = "auto"                      # piggyback forward order: auto | compose | mix_outputs
    sections: tuple = SECTIONS

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train_cases"] = [c.to_dict() for c in self.train_cases]
        d["infer_cases"] = [c.to_dict() for c in self.infer_cases]
        d["recipe_cases"] = [c.to_dict() for c in self.recipe_cases]
        return d


def preset(name: str) -> BenchConfig:
    if name == "full":
        return BenchConfig(
            mode="full",
            train_cases=(Case("resnet_9blocks", 128), Case("resnet_9blocks", 256), Case("unet_256", 256)),
            headline="resnet_9blocks@256", infer_headline="resnet_9blocks@256",
            recipe_cases=(Case("resnet_9blocks", 128), Case("resnet_9blocks", 256), Case("unet_256", 256)),
            recipe_levers=("unbatched", "adam_default", "adam_foreach", "channels_last", "direct_kernels"),
            pipeline=("suite",),
            infer_cases=(Case("resnet_9blocks", 256), Case("resnet_9blocks", 256, batch=4), Case("unet_256", 256)),
        )
    if name == "quick":
        # 8 train rounds (about a second each): on a shared 2-core VM the 128x128 step's rounds fell into
        # two groups about 400 ms apart, and a median of 4 could land in the slow one (1.43 vs 1.19).
        return BenchConfig(
            mode="quick",
            train_cases=(Case("resnet_9blocks", 128),), headline="resnet_9blocks@128", train_repeats=8,
            recipe_cases=(Case("resnet_9blocks", 128), Case("unet_256", 256)), recipe_repeats=5,
            recipe_levers=("unbatched", "adam_default", "adam_foreach", "channels_last", "direct_kernels"),
            infer_cases=(Case("resnet_9blocks", 128),), infer_repeats=12,
            fid_images=32, fid_size=64, fid_batch=32, fid_repeats=2,
            frechet_ours_repeats=3, frechet_theirs_repeats=1,
            pipeline=("tiny",), noop_repeats=2, memory_fid=False,
        )
    if name == "tiny":   # plumbing only (the unit test): seconds, no subprocesses, no dvc
        return BenchConfig(
            mode="tiny",
            train_cases=(Case("resnet_9blocks", 32, ngf=8),), headline="resnet_9blocks@32", train_warmup=1,
            train_repeats=2, recipe_cases=(Case("resnet_9blocks", 32, ngf=8),), recipe_repeats=2, recipe_levers=("unbatched",),
            infer_cases=(Case("resnet_9blocks", 32, ngf=8),), infer_warmup=1, infer_repeats=2,
            fid_images=4, fid_size=32, fid_batch=2, fid_warmup=1, fid_repeats=2, fid_stub=True,
            frechet_dims=64, frechet_samples=256, frechet_ours_repeats=2, frechet_theirs_repeats=2,
            pipeline=(), noop_repeats=1, memory="inprocess", memory_steps=1, growth_tasks=10, threads=1,
            recipe_process="inprocess", recipe_kept_heap=False,
            sections=tuple(s for s in SECTIONS if s != "pipeline"),
        )
    raise ValueError(f"unknown preset {name!r}")


# -- sections ------------------------------------------------------------------------------------
def _channels_last(cfg: BenchConfig, device: torch.device) -> bool:
    return device.type == "cuda" if cfg.channels_last == "auto" else cfg.channels_last == "on"


def run_train(cfg: BenchConfig, device: torch.device, results: dict) -> None:
    from . import nets

    cl = _channels_last(cfg, device)
    for case in cfg.train_cases:
        print(f"[train] {case.name}: plain vs piggyback task 1 vs task 3 (batch {case.batch})", flush=True)
        built = {w: nets.place(nets.candidate_net(case, w), device, cl) for w in ("plain", "task1", "task3")}
        x, y = nets.inputs(case, device, cl)
        steps = {w: nets.train_step_fn(n, x, y, device) for w, n in built.items()}
        timings = interleave(steps, cfg.train_warmup, cfg.train_repeats, device, case.name,
                             track_cuda_memory=device.type == "cuda")
        entry = {"case": case.to_dict(), "channels_last": cl, "timed": "generator forward + L1 + backward + Adam step",
                 "timings": timings, "ratios": ratios(timings, "plain"),
                 "trainable_params": {w: sum(p.numel() for p in nets.trainable(n)) for w, n in built.items()}}
        entry["diagnostics"] = {**nets.conv_macs(built["task3"], x), **nets.compose_time(built["task3"], device)}
        entry["diagnostics"]["compose_fwd_bwd_over_plain_step"] = (
            entry["diagnostics"]["compose_fwd_bwd_s"] / timings["plain"]["median_s"])
        results["train"][case.name] = entry
        r = entry["ratios"]
        print(f"[train] {case.name}: plain {timings['plain']['median_s'] * 1e3:.0f} ms, task1 x{r['task1']['ratio']:.3f}, "
              f"task3 x{r['task3']['ratio']:.3f} (compose fwd+bwd {entry['diagnostics']['compose_fwd_bwd_s'] * 1e3:.0f} ms)",
              flush=True)
        del built, steps
        gc.collect()
    for case in cfg.recipe_cases:
        if cfg.recipe_process == "inprocess":
            results["train_recipe"][case.name] = run_recipe(cfg, case, device, cl)
            results["train_recipe"][case.name]["process"] = "in-process"
        else:
            results["train_recipe"][case.name] = recipe_in_subprocess(cfg, case, device, cl)
            if cfg.recipe_kept_heap:
                kept = recipe_in_subprocess(cfg, case, device, cl, env=KEPT_HEAP_ENV, levers=False)
                results["train_recipe"][case.name]["kept_heap"] = {
                    "env": KEPT_HEAP_ENV, "timings": kept["timings"], "vs_reference": kept["vs_reference"]}


#: glibc malloc keeping what is freed (no trimming, no mmap for large blocks): the heap of a long-lived
#: process that has already held its largest tensors. The reference's time depends on it far more than
#: ours (its per-tensor Adam step allocates and frees a temporary per parameter), so each recipe case is
#: also measured this way, and the README reports both.
KEPT_HEAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def recipe_in_subprocess(cfg: BenchConfig, case, device: torch.device, cl: bool, env: dict | None = None,
                         levers: bool = True) -> dict:
    """`run_recipe` for one case in a fresh interpreter (`python -m benchmarks._case`), its progress lines
    passed through; the entry, with `process` saying how it was measured. A case's ratio then does not
    depend on the cases measured before it in this process (the allocator's state does: the pix2pix
    reference measured 0.69 vs 0.86 of ours in a fresh process and after the CycleGAN@256 case).
    Raises RuntimeError when the child fails."""
    from .memory import measure_in_subprocess

    spec = {"kind": "recipe", "case": dataclasses.asdict(case), "device": device.type, "channels_last": cl,
            "threads": cfg.threads, "order": cfg.order, "warmup": cfg.recipe_warmup, "repeats": cfg.recipe_repeats,
            "levers": list(cfg.recipe_levers) if levers else []}
    label = "fresh process" + (", " + " ".join(f"{k}={v}" for k, v in env.items()) if env else "")
    print(f"[train] {case.name}: in a {label}", flush=True)
    rep = measure_in_subprocess(spec, timeout=7200, env={**os.environ, **(env or {})}, echo=True)
    if "error" in rep:
        raise RuntimeError(f"recipe case {case.name}: {rep['error']}")
    return {**rep["entry"], "process": label}


def run_recipe(cfg: BenchConfig, case, device: torch.device, cl: bool) -> dict:
    """One full iteration: the reference, our recipe on plain generators and on task 3, interleaved on
    their own; then task 3 against each lever (our step one switch away), a second interleave. Two
    groups rather than one of eight: every candidate holds its own networks and optimiser state, and
    eight of them (several GB for the U-Net) made the headline ratio swing with the allocator's state
    (the same step measured 0.81 and 0.89 of the reference in one run)."""
    from . import nets

    mode = nets.ARCH[case.netG]["recipe"]
    print(f"[train] {case.name}: full {mode} iteration, reference vs plain vs task 3", flush=True)
    steps, info = {}, {}
    steps["reference"], info["reference"] = nets.reference_step_fn(case, device)
    for w in ("plain", "task3"):
        steps[w], info[w] = nets.recipe_step_fn(case, w, device, cl)
    timings = interleave(steps, cfg.recipe_warmup, cfg.recipe_repeats, device, case.name + " " + mode,
                         track_cuda_memory=device.type == "cuda")
    del steps["reference"], steps["plain"]
    gc.collect()
    lever_timings = {}
    if cfg.recipe_levers:
        print(f"[train] {case.name}: task 3 vs levers {list(cfg.recipe_levers)}", flush=True)
        for lever in cfg.recipe_levers:
            kw = {"channels_last": cl, **nets.LEVERS[lever]}
            if lever == "channels_last":
                kw["channels_last"] = not cl
            steps[f"task3_{lever}"], info[f"task3_{lever}"] = nets.recipe_step_fn(case, "task3", device, **kw)
        lever_timings = interleave(steps, 1, cfg.recipe_repeats, device, case.name + " levers",
                                   track_cuda_memory=device.type == "cuda")
    entry = {"case": case.to_dict(), "channels_last": cl, "timed": f"{mode}.train_step (G and D updates)",
             "timings": timings, "lever_timings": lever_timings, "ratios": ratios(timings, "plain"), "info": info,
             "vs_reference": ratios(timings, "reference"),
             "levers": {k[len("task3_"):]: v for k, v in ratios(lever_timings, "task3").items()
                        if k.startswith("task3_")} if lever_timings else {}}
    r = entry["vs_reference"]["task3"]
    print(f"[train] {case.name} {mode}: reference {timings['reference']['median_s'] * 1e3:.0f} ms, task3 "
          f"x{r['ratio']:.3f} (min x{r['min_ratio']:.3f}), task3 / plain x{entry['ratios']['task3']['ratio']:.3f}; "
          + ", ".join(f"{k} x{v['ratio']:.3f}" for k, v in entry["levers"].items()), flush=True)
    del steps
    gc.collect()
    return entry


def recipe_case(spec: dict) -> dict:
    """The child's side of `recipe_in_subprocess`: {"kind": "recipe", "entry": run_recipe(...)}."""
    from .core import configure_backend, resolve_device

    device = resolve_device(spec["device"])
    configure_backend(device, spec.get("threads"))
    _PiggybackConvNd.order = spec.get("order", "auto")
    cfg = BenchConfig(mode="recipe", recipe_warmup=spec["warmup"], recipe_repeats=spec["repeats"],
                      recipe_levers=tuple(spec["levers"]))
    entry = run_recipe(cfg, Case(**spec["case"]), device, bool(spec["channels_last"]))
    entry["malloc_env"] = {k: os.environ.get(k) for k in KEPT_HEAP_ENV}     # what this process ran under
    return {"kind": "recipe", "entry": entry}


def run_infer(cfg: BenchConfig, device: torch.device, results: dict) -> None:
    from . import nets

    cl = _channels_last(cfg, device)
    for case in cfg.infer_cases:
        print(f"[infer] {case.name}: plain vs materialised task 3 vs piggyback (batch {case.batch})", flush=True)
        built = {w: nets.place(nets.infer_candidate(case, w), device, cl) for w in ("plain", "materialized", "piggyback")}
        x, _ = nets.inputs(case, device, cl)
        with torch.inference_mode():
            ref = built["plain"](x)
            max_diff = max(float((built[w](x) - ref).abs().max()) for w in ("materialized", "piggyback"))
        calls = {w: nets.infer_fn(n, x, device) for w, n in built.items()}
        timings = interleave(calls, cfg.infer_warmup, cfg.infer_repeats, device, case.name,
                             track_cuda_memory=device.type == "cuda")
        results["infer"][case.name] = {"case": case.to_dict(), "channels_last": cl, "timings": timings,
                                       "ratios": ratios(timings, "plain"), "max_abs_diff_vs_plain": max_diff}
        r = results["infer"][case.name]["ratios"]
        print(f"[infer] {case.name}: plain {timings['plain']['median_s'] * 1e3:.1f} ms, materialised "
              f"x{r['materialized']['ratio']:.3f}, piggyback (composing) x{r['piggyback']['ratio']:.3f}", flush=True)
        del built, calls
        gc.collect()


def run_fid(cfg: BenchConfig, device: torch.device, results: dict, workdir: Path) -> None:
    from .fidbench import features_benchmark

    what = "stub network: plumbing only" if cfg.fid_stub else "random-weight Inception: timing only"
    print(f"[fid] features: {cfg.fid_images} images {cfg.fid_size}px, batch {cfg.fid_batch} ({what})", flush=True)
    res = features_benchmark(workdir / "fid", cfg.fid_images, cfg.fid_size, cfg.fid_batch, device,
                             cfg.fid_warmup, cfg.fid_repeats, stub=cfg.fid_stub)
    results["fid"] = res
    print(f"[fid] ours {res['ours_images_per_s']:.1f} img/s, pytorch-fid {res['pytorch_fid_images_per_s']:.1f} img/s "
          f"(x{res['feature_speedup']:.2f}; max |diff| {res['features_max_abs_diff']:.2e})", flush=True)


def run_frechet(cfg: BenchConfig, device: torch.device, results: dict, workdir: Path) -> None:
    from .fidbench import frechet_benchmark

    print(f"[frechet] {cfg.frechet_dims}-d covariances from {cfg.frechet_samples} samples", flush=True)
    (workdir / "fid").mkdir(parents=True, exist_ok=True)
    res = frechet_benchmark(workdir / "fid", cfg.frechet_dims, cfg.frechet_samples, cfg.frechet_ours_repeats,
                            cfg.frechet_theirs_repeats)
    results["frechet"] = res
    print(f"[frechet] ours {res['timings']['ours']['median_s']:.2f} s, pytorch-fid "
          f"{res['timings']['pytorch_fid']['median_s']:.2f} s: x{res['frechet_speedup']:.1f}, "
          f"relative difference {res['frechet_rel_diff']:.1e}", flush=True)


def run_pipeline(cfg: BenchConfig, device: torch.device, results: dict, workdir: Path) -> None:
    from .pipeline import pipeline_benchmark

    for variant in cfg.pipeline:
        print(f"[pipeline] {variant}", flush=True)
        results["pipeline"][variant] = pipeline_benchmark(workdir / "pipeline", variant, cfg.noop_repeats)


def run_memory(cfg: BenchConfig, device: torch.device, results: dict, workdir: Path) -> None:
    from ._case import measure
    from .memory import measure_in_subprocess

    cl = _channels_last(cfg, device)
    specs = {}
    for case in cfg.train_cases:
        for w in ("plain", "task1", "task3"):
            specs[f"train/{case.name}/{w}"] = {"kind": "train", "case": dataclasses.asdict(case), "candidate": w}
    for case in cfg.infer_cases:
        for w in ("plain", "materialized", "piggyback"):
            specs[f"infer/{case.name}/{w}"] = {"kind": "infer", "case": dataclasses.asdict(case), "candidate": w}
    for spec in specs.values():
        spec.update(device=device.type, channels_last=cl, steps=cfg.memory_steps, threads=cfg.threads,
                    order=cfg.order)
    fid = results.get("fid") or {}
    if "weights" in fid and cfg.memory_fid:
        for impl in ("ours", "pytorch_fid"):
            specs[f"fid_features/{impl}"] = {"kind": "fid_features", "impl": impl, "weights": fid["weights"],
                                             "folder": fid["folder"], "batch": cfg.fid_batch, "device": device.type}
    fr = results.get("frechet") or {}
    if "stats" in fr and cfg.memory_fid:
        for impl in ("ours", "pytorch_fid"):
            specs[f"frechet/{impl}"] = {"kind": "frechet", "impl": impl, "stats": fr["stats"], "device": "cpu"}
    for name, spec in specs.items():
        print(f"[memory] {name} ({cfg.memory})", flush=True)
        rep = measure_in_subprocess(spec) if cfg.memory == "subprocess" else measure(spec)
        rep["method"] = cfg.memory
        results["memory"][name] = rep
        if "error" in rep:
            print(f"[memory] {name}: {rep['error']}", flush=True)
        else:
            extra = f", CUDA max allocated {rep['cuda_max_allocated_mib']:.0f} MiB" if "cuda_max_allocated_mib" in rep else ""
            print(f"[memory] {name}: peak RSS {rep['peak_rss_mib']:.0f} MiB "
                  f"(+{rep.get('peak_delta_mib', float('nan')):.0f} MiB over the built state){extra}", flush=True)
    for variant, p in results.get("pipeline", {}).items():
        if p.get("repro_peak_rss_mib"):
            results["memory"][f"pipeline/{variant}"] = {"peak_rss_mib": p["repro_peak_rss_mib"],
                                                       "method": "largest descendant of dvc repro (ru_maxrss)"}


def run_growth(cfg: BenchConfig, device: torch.device, results: dict) -> None:
    from piggyback.accounting import growth_table

    for netG in cfg.growth_nets:
        overrides = {"last": 1.0} if netG.startswith("unet") else {}   # docs/method.md, "Parameter growth"
        for lam in cfg.growth_lams:
            rows = growth_table(netG, 64, cfg.growth_tasks, lam, lam_overrides=overrides)
            results["growth"][f"{netG}/lam={lam}"] = {"netG": netG, "ngf": 64, "lam": lam, "lam_overrides": overrides,
                                                      "tasks": cfg.growth_tasks, "rows": rows}
    print(f"[growth] {len(results['growth'])} tables", flush=True)


# -- summary -------------------------------------------------------------------------------------
def summarize(cfg: BenchConfig, results: dict) -> None:
    train, infer = results.get("train", {}), results.get("infer", {})
    if train:
        per_case = {name: e["ratios"]["task3"]["ratio"] for name, e in train.items()}
        head = cfg.headline if cfg.headline in per_case else max(per_case, key=per_case.get)
        results["train_overhead_task3"] = per_case[head]
        results["train_overhead_task3_case"] = head
        results["train_overhead_task3_floor"] = train[head]["diagnostics"].get("predicted_train_ratio")
        results["train_overhead_task3_worst"] = max(per_case.values())
        results["train_overhead_task3_per_case"] = per_case
        results["train_overhead_task1_per_case"] = {n: e["ratios"]["task1"]["ratio"] for n, e in train.items()}
    recipe = results.get("train_recipe", {})
    if recipe:
        results["train_recipe_overhead_task3_per_case"] = {n: e["ratios"]["task3"]["ratio"] for n, e in recipe.items()}
        results["recipe_vs_reference_task3"] = {n: e["vs_reference"]["task3"]["ratio"] for n, e in recipe.items()}
        results["recipe_vs_reference_task3_min"] = {n: e["vs_reference"]["task3"]["min_ratio"] for n, e in recipe.items()}
        results["recipe_levers_vs_default"] = {n: {k: v["ratio"] for k, v in e["levers"].items()}
                                               for n, e in recipe.items()}
        kept = {n: e["kept_heap"]["vs_reference"]["task3"]["ratio"] for n, e in recipe.items() if "kept_heap" in e}
        if kept:
            results["recipe_vs_reference_task3_kept_heap"] = kept
    if infer:
        per_case = {name: e["ratios"]["materialized"]["ratio"] for name, e in infer.items()}
        head = cfg.infer_headline if cfg.infer_headline in per_case else next(iter(per_case))
        results["infer_overhead"] = per_case[head]
        results["infer_overhead_case"] = head
        results["infer_overhead_worst"] = max(per_case.values())
        results["infer_overhead_per_case"] = per_case
        results["infer_overhead_unmaterialized_per_case"] = {n: e["ratios"]["piggyback"]["ratio"]
                                                             for n, e in infer.items()}
    if results.get("fid"):
        results["feature_speedup"] = results["fid"]["feature_speedup"]
    if results.get("frechet"):
        results["frechet_speedup"] = results["frechet"]["frechet_speedup"]
        results["frechet_rel_diff"] = results["frechet"]["frechet_rel_diff"]
    results["targets"] = {
        **{f"recipe_vs_reference_task3 {n} <= 0.80": _check(v, lambda v: v <= 0.80)
           for n, v in results.get("recipe_vs_reference_task3", {}).items()},
        **{f"train_recipe task3 / plain {n} <= 1.10": _check(v, lambda v: v <= 1.10)
           for n, v in results.get("train_recipe_overhead_task3_per_case", {}).items()},
        "train_overhead_task3 <= 1.10": _check(results.get("train_overhead_task3"), lambda v: v <= 1.10),
        "train_overhead_task3 <= 1.10 x its arithmetic floor": _check(
            _over(results.get("train_overhead_task3"), results.get("train_overhead_task3_floor")), lambda v: v <= 1.10),
        "infer_overhead <= 1.02": _check(results.get("infer_overhead"), lambda v: v <= 1.02),
        "frechet_speedup >= 5": _check(results.get("frechet_speedup"), lambda v: v >= 5),
        "frechet_rel_diff <= 1e-6": _check(results.get("frechet_rel_diff"), lambda v: v <= 1e-6),
    }


def _over(value, floor):
    """value / floor, or None when either is missing."""
    return value / floor if value is not None and floor else None


def _check(value, ok) -> str:
    if value is None or not math.isfinite(value):
        return "not measured"
    return "met" if ok(value) else "missed"


def table(results: dict) -> str:
    lines = []
    env = results["environment"]
    cpu = f" ({env['cpu_generation']})" if env["device"] == "cpu" and env.get("cpu_generation") else ""
    lines.append(f"piggyback-gan benchmarks ({results['mode']}) on {env['device_name']}{cpu} [{env['device']}], "
                 f"torch {env['torch']}, {env['threads']} threads, load {env.get('load_average_start')}")
    rows = []
    for name, e in results.get("train_recipe", {}).items():   # first: ours against the straightforward iteration
        t, r = e["timings"], e["vs_reference"]
        rows.append([f"{e['info']['task3']['recipe']} iteration {name}, task 3 vs reference",
                     f"reference {t['reference']['median_s'] * 1e3:.0f} ms",
                     f"task3 {t['task3']['median_s'] * 1e3:.0f} ms",
                     f"x{r['task3']['ratio']:.3f} (min x{r['task3']['min_ratio']:.3f})"])
        if "kept_heap" in e:
            t, r = e["kept_heap"]["timings"], e["kept_heap"]["vs_reference"]
            rows.append(["  the same, glibc keeping freed memory", f"reference {t['reference']['median_s'] * 1e3:.0f} ms",
                         f"task3 {t['task3']['median_s'] * 1e3:.0f} ms",
                         f"x{r['task3']['ratio']:.3f} (min x{r['task3']['min_ratio']:.3f})"])
    for name, e in results.get("train", {}).items():
        t, r = e["timings"], e["ratios"]
        rows.append([f"train step {name}", f"{t['plain']['median_s'] * 1e3:.0f} ms",
                     f"task1 {t['task1']['median_s'] * 1e3:.0f} ms (x{r['task1']['ratio']:.3f})",
                     f"task3 {t['task3']['median_s'] * 1e3:.0f} ms (x{r['task3']['ratio']:.3f})"])
    for name, e in results.get("train_recipe", {}).items():
        t, r = e["timings"], e["ratios"]
        rows.append([f"{e['info']['task3']['recipe']} iteration {name}", f"plain {t['plain']['median_s'] * 1e3:.0f} ms",
                     f"task3 {t['task3']['median_s'] * 1e3:.0f} ms (x{r['task3']['ratio']:.3f})",
                     ", ".join(f"{k} x{v['ratio']:.2f}" for k, v in e["levers"].items())])
    for name, e in results.get("infer", {}).items():
        t, r = e["timings"], e["ratios"]
        rows.append([f"inference {name}", f"{t['plain']['median_s'] * 1e3:.1f} ms",
                     f"materialised {t['materialized']['median_s'] * 1e3:.1f} ms (x{r['materialized']['ratio']:.3f})",
                     f"composing {t['piggyback']['median_s'] * 1e3:.1f} ms (x{r['piggyback']['ratio']:.3f})"])
    if results.get("fid"):
        f = results["fid"]
        rows.append([f"FID features ({f['images']} img)", f"pytorch-fid {f['pytorch_fid_images_per_s']:.1f} img/s",
                     f"ours {f['ours_images_per_s']:.1f} img/s", f"speedup x{f['feature_speedup']:.2f}"])
    if results.get("frechet"):
        f = results["frechet"]
        rows.append([f"Frechet {f['dims']}-d", f"pytorch-fid {f['timings']['pytorch_fid']['median_s']:.2f} s",
                     f"ours {f['timings']['ours']['median_s']:.2f} s",
                     f"x{f['frechet_speedup']:.1f}, rel diff {f['frechet_rel_diff']:.1e}"])
    for variant, p in results.get("pipeline", {}).items():
        if "error" in p:
            rows.append([f"dvc repro ({variant})", "failed", p["error"], ""])
        else:
            rows.append([f"dvc repro ({variant})", f"{p['repro_s']:.1f} s ({p['repro']['stages_run']} stages)",
                         f"no-op {p['noop_repro_s']:.2f} s", f"peak RSS {p.get('repro_peak_rss_mib') or 0:.0f} MiB"])
    if rows:
        lines.append(fmt_table(["case", "baseline", "ours", "ours / other"], rows))
    mem = results.get("memory", {})
    if mem:
        mrows = []
        for name, m in mem.items():
            if "error" in m:
                mrows.append([name, "error", "", ""])
                continue
            mrows.append([name, f"{m['peak_rss_mib']:.0f}",
                          f"{m['peak_delta_mib']:.0f}" if m.get("peak_delta_mib") is not None else "",
                          f"{m['cuda_max_allocated_mib']:.0f}" if "cuda_max_allocated_mib" in m else ""])
        lines.append("")
        lines.append(fmt_table(["peak memory (MiB)", "RSS", "RSS over built state", "CUDA max allocated"], mrows))
    growth = results.get("growth", {})
    if growth:
        grows = []
        for key, g in growth.items():
            r2, last = g["rows"][min(1, len(g["rows"]) - 1)], g["rows"][-1]
            grows.append([g["netG"], f"{g['lam']}", f"{r2['new_pct']:.1f} %", f"{last['stored_params']:,}",
                          f"{last['separate_params']:,}", f"{last['stored_pct']:.1f} %"])
        lines.append("")
        lines.append(fmt_table(["growth (ngf 64)", "lambda", "task 2 new/full", f"stored after {g['tasks']}",
                                "separate models", "stored/separate"], grows))
    lines.append("")
    for key in ("train_overhead_task3", "infer_overhead", "feature_speedup", "frechet_speedup", "frechet_rel_diff"):
        if key in results:
            where = f" ({results[key + '_case']})" if key + "_case" in results else ""
            lines.append(f"{key} = {results[key]:.4g}{where}")
    lines += [f"target {k}: {v}" for k, v in results.get("targets", {}).items()]
    busy = {k: v for k, v in results.get("other_processes_cores", {}).items() if v is not None and v > 0.25}
    if busy:
        lines.append("WARNING: other processes were busy during " + ", ".join(
            f"{k} ({v:.2f} cores)" for k, v in busy.items()) + ": re-run on a quiet machine for clean numbers")
    return "\n".join(lines)


# -- entry point ---------------------------------------------------------------------------------
def run(cfg: BenchConfig, device: torch.device, out: Path | None = LATEST, workdir: Path | None = None,
        verbose_table: bool = True) -> dict:
    """Run the configured sections; write `out` (atomically) and return the results."""
    threads_before = torch.get_num_threads()
    _PiggybackConvNd.order = cfg.order
    backend = configure_backend(device, cfg.threads)
    results = {"format_version": FORMAT_VERSION, "mode": cfg.mode, "config": cfg.to_dict(),
               "environment": environment(device, backend),
               "train": {}, "train_recipe": {}, "infer": {}, "fid": {}, "frechet": {}, "pipeline": {}, "memory": {}, "growth": {},
               "errors": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="piggyback-bench-") as tmp:
        work = Path(workdir or tmp)
        steps = [("growth", lambda: run_growth(cfg, device, results)),
                 ("train", lambda: run_train(cfg, device, results)),
                 ("infer", lambda: run_infer(cfg, device, results)),
                 ("fid", lambda: run_fid(cfg, device, results, work)),
                 ("frechet", lambda: run_frechet(cfg, device, results, work)),
                 ("pipeline", lambda: run_pipeline(cfg, device, results, work)),
                 ("memory", lambda: run_memory(cfg, device, results, work))]
        for name, fn in steps:
            if name not in cfg.sections:
                continue
            t0 = time.perf_counter()
            with OtherLoad() as other:
                try:
                    fn()
                except Exception as e:  # keep the other sections' numbers; the error is recorded and reported
                    traceback.print_exc()
                    results["errors"][name] = f"{type(e).__name__}: {e}"
            results.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
            results.setdefault("other_processes_cores", {})[name] = other.cores
            if other.cores is not None and other.cores > 0.25:
                print(f"[{name}] WARNING: other processes used {other.cores:.2f} cores meanwhile: "
                      "timings are contaminated", flush=True)
    torch.set_num_threads(threads_before)
    _PiggybackConvNd.order = "auto"
    results["environment"]["load_average_end"] = load_average()
    results["total_seconds"] = time.perf_counter() - start
    summarize(cfg, results)
    if out is not None:
        write_json(out, results)
    if verbose_table:
        print()
        print(table(results))
        if out is not None:
            print(f"\nwrote {out} ({results['total_seconds']:.0f} s)")
    return results
