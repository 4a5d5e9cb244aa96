"""stages.train end to end on tiny data: outputs, metrics files, MLflow run, clear errors before training."""
import csv
import json

import pytest
import torch

from piggyback.checkpoint import load_lifelong, load_probes, read_meta
from piggyback.trainstate import lr_lambda
from train_helpers import make_data, run_init, run_train, single_thread, write_params  # noqa: F401

CYCLE = {"t1": {"dataset": "daynight", "prev": "init", "mode": "cyclegan"}}


def test_lr_schedule_is_constant_then_linear():
    rule = lr_lambda(epochs=2, epochs_decay=3)
    assert [rule(e) for e in range(5)] == pytest.approx([1, 1, 0.75, 0.5, 0.25])  # never reaches 0


def test_one_task_outputs_metrics_and_mlflow(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    data = make_data(tmp_path, ["daynight"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_STAGE", "train@t1")
    params = write_params(tmp_path / "params.yaml", CYCLE, train={"max_steps": 3, "epochs": 2},
                          mlflow={"enabled": True, "experiment": "smoke"})
    models, metrics = tmp_path / "models", tmp_path / "metrics"
    run_init(params, models)
    run_train("t1", params, models, data, metrics)

    # Checkpoint: task 1 with both generators, probes, run id; no snapshot left behind.
    assert sorted(p.name for p in (models / "t1").iterdir()) == ["generators.pt", "meta.json", "probes.pt"]
    assert not (models / ".snapshots").exists()
    model = load_lifelong(models / "t1")
    (rec,) = model.tasks
    assert rec["name"] == "t1" and rec["mode"] == "cyclegan" and rec["train"]["steps"] == 3
    assert set(rec["probe_sha256"]) == {"G_A", "G_B"} and rec["mlflow_run_id"]
    probes = load_probes(models / "t1")
    assert probes["t1"]["G_A"]["input"].shape == (2, 3, 32, 32)

    # DVC metrics and plots.
    summary = json.loads((metrics / "info" / "train" / "t1.json").read_text())   # the full record
    assert summary["steps"] == 3 and summary["epochs"] == 1 and summary["images_per_s"] > 0
    assert summary["mlflow_run_id"] == rec["mlflow_run_id"] and summary["params"]["new_params"] > 0
    assert {"G", "D_A", "D_B", "cycle_A", "idt_B"} <= set(summary["final_losses"])
    rows = list(csv.DictReader((metrics / "train" / "t1.csv").open()))
    assert len(rows) == 1 and rows[0]["epoch"] == "1" and rows[0]["step"] == "3"
    assert float(rows[0]["lr"]) == pytest.approx(2e-4) and float(rows[0]["images_per_s"]) > 0

    # MLflow: one finished run with the task's params, per-step losses, images and parameter counts.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(rec["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "train:t1"
    assert run.data.tags["task"] == "t1" and run.data.tags["dvc.stage"] == "train@t1"
    p = run.data.params
    assert p["train.lr"] == "0.0002" and p["mode"] == "cyclegan" and p["dataset"] == "daynight"
    assert p["model.ngf"] == "4" and p["train.cyclegan.lambda_A"] == "10.0" and p["epochs"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/G")] == [1, 2, 3]
    assert {"lr", "images_per_s", "params/new_params", "params/stored_params", "params/G_trainable"} <= set(run.data.metrics)
    arts = {a.path for d in ("", "samples", "metrics") for a in client.list_artifacts(run.info.run_id, d or None)}
    assert {"samples/epoch_001.png", "metrics/t1.json", "metrics/t1.csv", "task_record.json"} <= arts
    assert client.get_experiment_by_name("smoke").artifact_location.startswith((tmp_path / "mlartifacts").as_uri())


def test_unet_batchnorm_pix2pix_path(tmp_path):
    """pix2pix with a batch-norm U-Net (dropout on) at 128x128: per-task BN state reaches the checkpoint."""
    specs = {"edges128": ("edges", 128, 2, 2)}
    data = make_data(tmp_path, ["edges128"], specs=specs)
    params = write_params(tmp_path / "params.yaml", {"t1": {"dataset": "edges128", "prev": "init", "mode": "pix2pix"}},
                          model={"netG": "unet_128", "ngf": 2, "ndf": 2, "norm": "batch", "use_dropout": True},
                          data={"load_size": 132, "crop_size": 128}, train={"max_steps": 2, "probe_images": 1},
                          specs=specs)
    models = tmp_path / "models"
    run_init(params, models)
    run_train("t1", params, models, data, tmp_path / "metrics")
    model = load_lifelong(models / "t1")
    state = torch.load(models / "t1" / "generators.pt", weights_only=True)["G_A"]
    tracked = [v for k, v in state.items() if k.endswith("num_batches_tracked_1")]
    assert tracked and all(int(v) == 2 for v in tracked)   # two training steps updated the running stats
    assert model.tasks[0]["probe_sha256"]["G_A"]


@pytest.mark.parametrize("case, expected", [
    ("no_init", "models/init not found: run `dvc repro init` first"),
    ("no_prev", "models/t1 not found: run `dvc repro train@t1` first"),
    ("no_data", "not found: run `dvc repro prepare@thermal`"),
    ("bad_value", "train.lr: expected float"),
    ("unknown_key", "Unknown config key: train.lrr"),
    ("other_arch", "model.ngf: the checkpoint was built with 4, params ask for 8"),
    ("other_method", "train.method: the checkpoint was built with 'piggyback'"),
    ("exists", "models/t1 already exists"),
    ("unpaired_pix2pix", "pix2pix needs a paired dataset"),
    ("no_task", "tasks.t9: no such task"),
])
def test_clear_errors_before_training(tmp_path, case, expected):
    data = make_data(tmp_path, ["daynight"])
    models = tmp_path / "models"
    tasks = {"t1": {"dataset": "daynight", "prev": "init", "mode": "cyclegan"},
             "t2": {"dataset": "thermal", "prev": "t1", "mode": "cyclegan"}}
    good = write_params(tmp_path / "good.yaml", tasks)
    if case != "no_init":
        run_init(good, models)
    task, kw = "t1", {}
    if case == "no_prev":
        task = "t2"
    elif case == "no_data":
        (models / "t1").mkdir()
        (models / "t1" / "meta.json").write_text("{}")
        task = "t2"
    elif case == "bad_value":
        kw = {"train": {"lr": "fast"}}
    elif case == "unknown_key":
        kw = {"train": {"lrr": 1.0}}
    elif case == "other_arch":
        kw = {"model": {"ngf": 8}}
    elif case == "other_method":
        kw = {"train": {"method": "separate"}}
    elif case == "exists":
        (models / "t1").mkdir()
    elif case == "unpaired_pix2pix":
        tasks["t1"]["mode"] = "pix2pix"
    elif case == "no_task":
        task = "t9"
    params = write_params(tmp_path / "params.yaml", tasks, **kw)
    with pytest.raises(SystemExit) as exc:
        run_train(task, params, models, data, tmp_path / "metrics")
    msg = str(exc.value.code)
    assert msg.startswith(f"train@{task}: ") and expected in msg, msg
    assert not (models / ".snapshots").exists() and not (tmp_path / "metrics").exists()


def test_per_dataset_crop_size_reaches_the_training_transform(tmp_path):
    """datasets.<key>.crop_size / load_size override data.* for that dataset's tasks: the batches the
    training loop draws, the probes and the MLflow params are at the dataset's size."""
    from piggyback.config import load_params
    from piggyback.training import TaskPaths, _load_inputs, _tracked_params

    data = make_data(tmp_path, ["daynight"])
    path = write_params(tmp_path / "params.yaml", CYCLE, datasets={"daynight": {
        "source": "embedded", "kind": "daynight", "size": 32, "crop_size": 24, "load_size": 28}})
    models = tmp_path / "models"
    run_init(path, models)
    params = load_params(path)
    inputs = _load_inputs(params, "t1", TaskPaths(prev=models / "init", data=data / "daynight", out=models / "t1",
                                                  metrics=tmp_path / "metrics", models=models))
    inputs.loader.dataset.set_epoch(0)
    batch = next(iter(inputs.loader))
    assert batch["A"].shape[-2:] == (24, 24) and batch["B"].shape[-2:] == (24, 24)   # data.crop_size is 32
    assert inputs.probe_inputs["G_A"].shape[-2:] == (24, 24)
    tracked = _tracked_params(params, "t1", 1)
    assert (tracked["data.crop_size"], tracked["data.load_size"]) == (24, 28)


def test_init_stage_writes_empty_model(tmp_path):
    params = write_params(tmp_path / "params.yaml", CYCLE, model={"lam": 0.5}, train={"method": "separate"})
    run_init(params, tmp_path / "models")
    meta = read_meta(tmp_path / "models" / "init")
    assert meta["tasks"] == [] and meta["method"] == "separate" and meta["config"]["lam"] == 0.5
    with pytest.raises(SystemExit, match="already exists"):
        run_init(params, tmp_path / "models")
