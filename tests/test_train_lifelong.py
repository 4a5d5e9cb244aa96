"""Tasks in sequence: the last checkpoint reproduces every earlier task bit for bit; a paired task learns."""
import json

import torch

from piggyback.checkpoint import load_lifelong, load_probes
from piggyback.config import load_params
from piggyback.data.datasets import TestSet
from piggyback.fsutil import sha256_file
from piggyback.lifelong import LifelongModel
from piggyback.probes import check_probes, run_probe
from piggyback.training import task_seed
from train_helpers import make_data, run_init, run_train, single_thread, write_params  # noqa: F401


def test_three_tasks_no_forgetting(tmp_path):
    data = make_data(tmp_path, ["edges", "daynight", "facades"])
    tasks = {
        "t1": {"dataset": "edges", "prev": "init", "mode": "pix2pix"},
        "t2": {"dataset": "daynight", "prev": "t1", "mode": "cyclegan", "epochs": 2, "epochs_decay": 0},
        "t3": {"dataset": "facades", "prev": "t2", "mode": "pix2pix", "direction": "BtoA", "lam": 0.5},
    }
    params = write_params(tmp_path / "params.yaml", tasks, train={"max_steps": 3})
    models, metrics = tmp_path / "models", tmp_path / "metrics"
    run_init(params, models)
    files = {}
    for t in tasks:
        run_train(t, params, models, data, metrics)
        files[t] = {f.name: sha256_file(f) for f in (models / t).iterdir()}

    # Earlier checkpoints are read-only inputs: untouched by later tasks.
    for t in ("t1", "t2"):
        assert {f.name: sha256_file(f) for f in (models / t).iterdir()} == files[t]

    final = load_lifelong(models / "t3")   # also checks every task's tensor hashes
    assert final.task_names() == ["t1", "t2", "t3"]
    assert [r["index"] for r in final.tasks] == [{"G_A": 1}, {"G_A": 2, "G_B": 1}, {"G_A": 3}]
    assert final.tasks[2]["lam"] == 0.5 and final.tasks[2]["direction"] == "BtoA"
    recipe = final.task("t2")["train"]["recipe"]                 # per-task overrides reached the recipe
    assert (recipe["epochs"], recipe["epochs_decay"], final.task("t1")["train"]["recipe"]["epochs"]) == (2, 0, 1)
    assert json.loads((metrics / "train" / "t3.json").read_text())["steps"] == 3

    # Every task, rebuilt from the last checkpoint, reproduces its probe bit for bit.
    probes = load_probes(models / "t3")
    assert set(probes) == {"t1", "t2", "t3"} and set(probes["t2"]) == {"G_A", "G_B"}
    assert check_probes(final, probes) == {"t1": {"G_A": True}, "t2": {"G_A": True, "G_B": True}, "t3": {"G_A": True}}
    for t, ckpt in (("t1", "t1"), ("t2", "t2"), ("t1", "t2")):   # carried forward unchanged
        earlier = load_probes(models / ckpt)[t]
        for which, p in earlier.items():
            assert torch.equal(p["output"], probes[t][which]["output"]) and p["sha256"] == probes[t][which]["sha256"]
            assert final.task(t)["probe_sha256"][which] == p["sha256"]
            assert torch.equal(run_probe(final.generator(t, which), p["input"]), p["output"])


def _l1(net, test: TestSet) -> float:
    x = torch.stack([test[i]["A"] for i in range(len(test))])
    y = torch.stack([test[i]["B"] for i in range(len(test))])
    return (run_probe(net, x) - y).abs().mean().item()


def test_paired_task_learns(tmp_path):
    """pix2pix on the embedded 'edges' task: test L1 to the ground truth falls well below the untrained L1."""
    specs = {"edges_big": ("edges", 32, 32, 8)}
    data = make_data(tmp_path, ["edges_big"], specs=specs)
    params = write_params(tmp_path / "params.yaml", {"t1": {"dataset": "edges_big", "prev": "init", "mode": "pix2pix"}},
                          model={"ngf": 8, "ndf": 8}, train={"epochs": 12, "epochs_decay": 0, "batch_size": 4, 
                                                              "log_every": 50}, specs=specs)
    models = tmp_path / "models"
    run_init(params, models)
    run_train("t1", params, models, data, tmp_path / "metrics")
    test = TestSet(data / "edges_big", size=32)
    trained = _l1(load_lifelong(models / "t1").generator("t1"), test)

    untrained_model = load_lifelong(models / "init")
    torch.manual_seed(task_seed(load_params(params), 0))   # the initial weights training started from
    untrained_model.add_task("t1", "pix2pix")
    untrained = _l1(untrained_model.generators["G_A"], test)
    print(f"test L1: untrained {untrained:.3f}, trained {trained:.3f}")
    assert trained < 0.6 * untrained
