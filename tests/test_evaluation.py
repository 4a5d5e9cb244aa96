"""Stage evaluate@<task>: translations as PNG, ground-truth metrics, FID/KID availability rules, MLflow.

Tiny setting: resnet_6blocks with ngf 4 on 32x32 embedded data. FID plumbing uses a random-weight
Inception (tests/fid_helpers.py), whose numbers must never be reported as FID.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from piggyback import GeneratorConfig, LifelongModel, save_lifelong
from piggyback import evaluation as ev
from piggyback import scoring, translate
from piggyback.data.embedded import generate
from piggyback.data.prepare import prepare_dataset
from piggyback.fsutil import sha256_file
from piggyback.lifelong import task_parameters
from piggyback.probes import probe_inputs, record_probes

SIZE = 32
CFG = GeneratorConfig(netG="resnet_6blocks", ngf=4, norm="instance")
DATASETS = {"emb_edges": "edges", "emb_daynight": "daynight", "emb_labels": "edges"}
TASKS = {"t1": ("emb_edges", "pix2pix"), "t2": ("emb_daynight", "cyclegan"), "t3": ("emb_labels", "pix2pix")}


def write_params(path: Path, method: str = "piggyback", tasks: dict = TASKS, **eval_cfg) -> Path:
    """A params.yaml for the tiny chain; `eval_cfg` overrides the eval section."""
    raw = {
        "datasets": {k: {"source": "embedded", "kind": v, "size": SIZE, "n_train": 2, "n_test": 4}
                     for k, v in DATASETS.items()},
        "data": {"load_size": SIZE, "crop_size": SIZE},
        "model": {"netG": CFG.netG, "ngf": CFG.ngf, "ndf": 4},
        "train": {"method": method, "probe_images": 2},
        "tasks": {t: {"dataset": ds, "prev": "init" if i == 0 else list(tasks)[i - 1], "mode": mode}
                  for i, (t, (ds, mode)) in enumerate(tasks.items())},
        "eval": {"batch_size": 3, "grid_images": 3, "kid_subsets": 5, **eval_cfg},
        "mlflow": {"enabled": False},
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def make_data(root: Path) -> Path:
    """data/prepared/<dataset> for every dataset of the chain (4 test images each)."""
    for key, kind in DATASETS.items():
        generate(kind, root / "raw" / key, seed=len(key), size=SIZE, n_train=2, n_test=4)
        prepare_dataset(root / "raw" / key, root / "prepared" / key, dataset=key, workers=1)
    return root / "prepared"


def make_chain(models: Path, data: Path, method: str = "piggyback", tasks: dict = TASKS, run_ids: dict = {}) -> LifelongModel:
    """Train-free stand-in for the train stages: each task's tensors moved off their init, probes recorded
    on its first 2 test inputs, then models/<task>/ saved with every probe so far (as training does)."""
    torch.manual_seed(0)
    model, probes = LifelongModel(CFG, method), {}
    for name, (ds, mode) in tasks.items():
        nets = model.add_task(name, mode, "AtoB", ds)
        with torch.no_grad():
            for net in nets.values():
                for p in task_parameters(net):
                    p.add_(torch.randn_like(p) * 0.3)
        model.finish_task(mlflow_run_id=run_ids.get(name))
        probes[name] = record_probes(model, name, probe_inputs(data / ds, mode, "AtoB", SIZE, 2))
        save_lifelong(model, models / name, probes=dict(probes))
    return model


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """root/ with prepared/ and models/{t1,t2,t3}/ (piggyback method)."""
    root = tmp_path_factory.mktemp("chain")
    make_chain(root / "models", make_data(root))
    return root


@pytest.fixture(scope="module")
def standin_weights(tmp_path_factory) -> Path:
    from fid_helpers import write_random_inception

    return write_random_inception(tmp_path_factory.mktemp("inception") / "random_inception.pth")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch hub cache and a downloader that must not be reached (it fails if it is)."""
    calls = []

    def refuse(url, dst, *args, **kwargs):
        calls.append(url)
        raise OSError("network disabled in tests")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return calls


def run_stage(root: Path, tmp: Path, task: str, params: Path) -> dict:
    from stages.evaluate import main

    main([task, "--params", str(params), "--models", str(root / "models"), "--data", str(root / "prepared"),
          "--metrics", str(tmp / "metrics"), "--out", str(tmp / "translated"), "--fid-cache", str(tmp / "fid_cache")])
    return json.loads((tmp / "metrics" / "info" / "tasks" / f"{task}.json").read_text())


def test_offline_without_weights_records_fid_unavailable(chain, tmp_path, offline):
    m = run_stage(chain, tmp_path, "t1", write_params(tmp_path / "params.yaml"))
    assert offline, "the download route was not tried"
    assert m["fid"] is None and m["kid"] is None and m["kid_std"] is None
    assert "no FID Inception weights" in m["fid_reason"] and "network disabled in tests" in m["fid_reason"]
    assert m["inception_sha256"] is None and not any(k.endswith(scoring.NONOFFICIAL) for k in m)
    # Ground truth (paired task): finite metrics, same numbers as scoring the saved translations' source.
    assert {m["task"], m["dataset"], m["mode"], m["direction"], m["n_test"]} == {"t1", "emb_edges", "pix2pix", "AtoB", 4}
    assert all(isinstance(m[k], float) for k in ("l1", "psnr", "ssim")) and m["gt_reason"] is None
    assert 0 < m["l1"] < 1 and -1 <= m["ssim"] <= 1
    out = tmp_path / "translated" / "t1"
    assert sorted(p.name for p in (out / "fake_B").iterdir()) == [f"{i:04d}.png" for i in range(4)]
    assert len(list((out / "real_B").iterdir())) == 4 and not (out / "fake_A").exists()
    grid = Image.open(out / "grid.png")
    assert grid.size == (3 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2)  # 3 items x rows input / translation / truth
    with Image.open(out / "fake_B" / "0000.png") as img:
        assert img.format == "PNG" and img.size == (SIZE, SIZE) and img.mode == "RGB"
    json.dumps(m, allow_nan=False)


def test_translations_are_the_generator_outputs(chain, tmp_path, offline):
    """The saved PNGs are the materialised task generator's outputs on the test inputs, rounded."""
    from piggyback.checkpoint import load_lifelong
    from piggyback.data.datasets import TestSet

    run_stage(chain, tmp_path, "t3", write_params(tmp_path / "params.yaml"))
    ts = TestSet(chain / "prepared" / "emb_labels", "AtoB", SIZE)
    x = torch.stack([ts[i]["A"] for i in range(len(ts))])
    with torch.no_grad():
        y = load_lifelong(chain / "models" / "t3").generator("t3")(x)
    saved = np.stack([np.array(Image.open(tmp_path / "translated" / "t3" / "fake_B" / f"{ts[i]['name']}.png"))
                      for i in range(len(ts))])
    assert np.abs(saved.astype(int) - translate.to_uint8(y).astype(int)).max() <= 1


def test_require_fid_fails_with_the_reason_before_any_work(chain, tmp_path, offline):
    with pytest.raises(SystemExit) as e:
        run_stage(chain, tmp_path, "t1", write_params(tmp_path / "params.yaml", require_fid=True))
    assert "require_fid" in str(e.value) and "network disabled in tests" in str(e.value)
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "translated").exists()


def test_standin_weights_are_never_reported_as_fid(chain, tmp_path, offline, standin_weights):
    """A weights file that is not the official one: values under *_nonofficial_weights, fid/kid null, a warning;
    with require_fid the stage refuses. CycleGAN task: the reverse direction is scored too."""
    params = write_params(tmp_path / "params.yaml", fid_weights=str(standin_weights))
    with pytest.warns(UserWarning, match="not pytorch-fid's FID Inception"):
        m = run_stage(chain, tmp_path, "t2", params)
    assert not offline  # a params path is used as given: no download
    for p in ("", "reverse_"):
        assert m[f"{p}fid"] is None and m[f"{p}kid"] is None and m[f"{p}kid_std"] is None
        assert "not pytorch-fid's FID Inception" in m[f"{p}fid_reason"]
        assert np.isfinite(m[f"{p}fid{scoring.NONOFFICIAL}"]) and m[f"{p}fid{scoring.NONOFFICIAL}"] > 0
        assert np.isfinite(m[f"{p}kid{scoring.NONOFFICIAL}"]) and m[f"{p}kid_std{scoring.NONOFFICIAL}"] >= 0
        assert m[f"{p}kid_subset_size"] == 4 and m[f"{p}kid_subsets"] == 5  # lowered to the small test set
        assert all(isinstance(m[f"{p}{k}"], float) for k in ("l1", "psnr", "ssim"))  # embedded truth
    assert m["inception_sha256"] == sha256_file(standin_weights) and m["inception_official"] is False
    out = tmp_path / "translated" / "t2"
    assert len(list((out / "fake_A").iterdir())) == 4 and (out / "grid_reverse.png").is_file()
    # Real-image features are cached once per (images, weights, dataset, split, domain, resolution).
    cached = sorted((tmp_path / "fid_cache").glob("*.npz"))
    assert len(cached) == 2
    parts = {json.loads(str(np.load(p)["parts"]))["domain"] for p in cached}
    assert parts == {"A", "B"}
    with pytest.raises(SystemExit, match="require_fid"):
        run_stage(chain, tmp_path, "t2", write_params(params, fid_weights=str(standin_weights), require_fid=True))


def test_official_weights_give_fid_and_cached_reference(chain, tmp_path, standin_weights, monkeypatch):
    """Official weights (hash check stubbed): values go under fid / kid, and the second run reads the cache."""
    monkeypatch.setattr(scoring.fidlib, "is_official_sha256", lambda sha: True)
    fm = scoring.load_fid_model(str(standin_weights))
    assert fm.official and fm.reason is None
    from piggyback.config import load_params

    params = load_params(write_params(tmp_path / "params.yaml"))
    calls = []
    real_extract = scoring.fidlib.extract_features
    monkeypatch.setattr(scoring.fidlib, "extract_features", lambda files, *a, **k: calls.append(len(files)) or real_extract(files, *a, **k))
    runs = [ev.evaluate_task(params, "t1", chain / "models" / "t1", chain / "prepared" / "emb_edges", tmp_path / f"o{i}",
                             tmp_path / "cache", device="cpu", progress=False, fid_model=fm).metrics for i in range(2)]
    assert calls == [4, 4, 4]  # reals + fakes, then fakes only
    assert runs[0]["fid"] == runs[1]["fid"] and runs[0]["fid"] > 0 and runs[0]["fid_reason"] is None
    assert runs[0]["kid"] == runs[1]["kid"] and not any(k.endswith(scoring.NONOFFICIAL) for k in runs[0])


def test_unpaired_without_truth_reports_gt_reason(chain, tmp_path, offline):
    data = tmp_path / "prepared"
    shutil.copytree(chain / "prepared", data)
    for d in (data / "emb_daynight").glob("test*_truth"):
        shutil.rmtree(d)
    root = tmp_path / "root"
    root.mkdir()
    (root / "models").symlink_to(chain / "models")
    (root / "prepared").symlink_to(data)
    m = run_stage(root, tmp_path, "t2", write_params(tmp_path / "params.yaml"))
    for p in ("", "reverse_"):
        assert m[f"{p}l1"] is None and m[f"{p}psnr"] is None and m[f"{p}ssim"] is None
        assert "no true output" in m[f"{p}gt_reason"]
    assert Image.open(tmp_path / "translated" / "t2" / "grid.png").size[1] == 2 * (SIZE + 2) + 2  # two rows


def test_missing_inputs_name_the_stage_to_run(chain, tmp_path, offline):
    params = write_params(tmp_path / "params.yaml")
    from stages.evaluate import main

    with pytest.raises(SystemExit, match=r"models/t1 not found: run `dvc repro train@t1`"):
        main(["t1", "--params", str(params), "--models", str(tmp_path / "models"), "--data", str(chain / "prepared")])
    with pytest.raises(SystemExit, match=r"emb_edges not found: run `dvc repro prepare@emb_edges`"):
        main(["t1", "--params", str(params), "--models", str(chain / "models"), "--data", str(tmp_path / "nodata")])


def test_metrics_logged_into_an_evaluate_run_linked_to_the_training_run(chain, tmp_path, offline, monkeypatch):
    from piggyback.config import MlflowConfig
    from piggyback.tracking import open_run, tracking_uri

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    cfg = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="unit")
    run = open_run(cfg, 0, "train:t1")
    run.end()
    root = tmp_path / "root"
    make_chain(root / "models", chain / "prepared", tasks={"t1": TASKS["t1"]}, run_ids={"t1": run.run_id})
    (root / "prepared").symlink_to(chain / "prepared")
    params = write_params(tmp_path / "params.yaml", tasks={"t1": TASKS["t1"]})
    raw = yaml.safe_load(params.read_text())
    raw["mlflow"] = {"enabled": True, "tracking_uri": cfg.tracking_uri, "experiment": "unit"}
    params.write_text(yaml.safe_dump(raw))
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    train_end = client.get_run(run.run_id).info.end_time
    m = run_stage(root, tmp_path, "t1", params)

    trained = client.get_run(run.run_id)
    assert trained.info.status == "FINISHED" and trained.info.end_time == train_end   # not reopened
    assert "l1" not in trained.data.metrics
    exp = client.get_experiment_by_name("unit")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"   # the UI opens on the runs
    (ev,) = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'evaluate'")
    assert ev.info.run_name == "evaluate:t1" and ev.info.status == "FINISHED"
    assert ev.data.tags["train_run_id"] == run.run_id and ev.data.tags["mlflow.parentRunId"] == run.run_id
    assert {k: ev.data.metrics[k] for k in ("l1", "psnr", "ssim", "n_test", "identity_l1")} == \
        {k: float(m[k]) for k in ("l1", "psnr", "ssim", "n_test", "identity_l1")}
    assert "fid" not in ev.data.metrics and ev.data.tags["eval.fid_reason"] == m["fid_reason"]
    assert [a.path for a in client.list_artifacts(ev.info.run_id, "evaluation")] == ["evaluation/grid.png"]
