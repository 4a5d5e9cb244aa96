"""Parameter growth (docs/method.md): analytic table, counts measured on built networks, `piggyback growth`."""
import json

import pytest

from piggyback import GeneratorConfig, LifelongModel, build_generator, cli, growth_table, lifelong
from piggyback.accounting import measure

pytestmark = pytest.mark.usefixtures("single_thread")

RESNET9 = {"new": [11_378_179, 3_813_881, 4_055_035, 4_296_189], "stored": 23_543_284, "pct": 51.73}
# unet_256 (batch norm, last layer lambda 1.0). Our convs follow junyanz's bias rule (no bias before a
# BatchNorm); the published row (docs/method.md, "Parameter growth") counts a bias on every conv, as the public Piggyback code creates one:
# 5,504 more per task (the 15 bias-free convs' out channels). Both are reproduced.
UNET256 = {"new": [54_404_099, 15_504_131, 15_978_755, 16_453_379], "pct": 47.03}
UNET256_PUBLISHED = {"new": [54_409_603, 15_509_635, 15_984_259, 16_458_883], "pct": 47.03}


def test_analytic_growth_resnet9_matches_design():
    rows = growth_table("resnet_9blocks", 64, tasks=4, lam=0.25)
    assert [r["new_params"] for r in rows] == RESNET9["new"]
    assert rows[-1]["stored_params"] == RESNET9["stored"] and rows[-1]["separate_params"] == 4 * 11_378_179
    assert rows[-1]["stored_pct"] == RESNET9["pct"] and round(rows[-1]["stored_pct"], 1) == 51.7
    assert [r["new_pct"] for r in rows[1:]] == [33.52, 35.64, 37.76]
    doubled = growth_table("resnet_9blocks", 64, tasks=4, lam=0.25, generators=2)   # CycleGAN: G_A + G_B
    assert doubled[-1]["stored_params"] == 2 * RESNET9["stored"]


def test_analytic_growth_unet256_with_last_layer_lambda_one():
    rows = growth_table("unet_256", 64, tasks=4, lam=0.25, lam_overrides={"last": 1.0})
    assert [r["new_params"] for r in rows] == UNET256["new"] and rows[-1]["stored_pct"] == UNET256["pct"]
    assert rows[0]["new_params"] + rows[0]["new_norm_params"] == 54_413_955       # junyanz's count
    assert rows[-1]["stored_norm_params"] == 4 * 9_856
    design = growth_table("unet_256", 64, tasks=4, lam=0.25, lam_overrides={"last": 1.0}, bias_everywhere=True)
    assert [r["new_params"] for r in design] == UNET256_PUBLISHED["new"]
    assert design[-1]["stored_pct"] == UNET256_PUBLISHED["pct"] and round(design[-1]["stored_pct"], 1) == 47.0


@pytest.mark.parametrize("netG, overrides, expected", [
    ("resnet_9blocks", {}, RESNET9["new"]),
    ("unet_256", {"last": 1.0}, UNET256["new"]),
])
def test_counts_measured_on_full_size_networks(netG, overrides, expected):
    """Real layers after add_task (never run): their tensors hold exactly the analytic counts."""
    cfg = GeneratorConfig(netG=netG, ngf=64, norm="batch" if netG.startswith("unet") else "instance",
                          lam_overrides=overrides)
    net = build_generator(cfg)
    stored = 0
    for t, new in enumerate(expected, start=1):
        lifelong.add_task(net)
        counts = measure(net)
        stored += new
        assert (counts["tasks"], counts["new_params"], counts["stored_params"]) == (t, new, stored)
        assert sum(p.numel() for p in lifelong.task_parameters(net)) == new + counts["norm_params_per_task"]
    if netG == "resnet_9blocks":
        assert stored == RESNET9["stored"]


@pytest.mark.parametrize("method", ["piggyback", "separate", "finetune"])
@pytest.mark.parametrize("netG, lam, overrides", [
    ("resnet_6blocks", 0.3, {"first": 0.5}), ("unet_128", 0.125, {"last": 1.0}), ("unet_128", 1.0, {})])
def test_measured_records_equal_the_analytic_table(method, netG, lam, overrides):
    norm = "batch" if netG.startswith("unet") else "instance"
    cfg = GeneratorConfig(netG=netG, ngf=8, norm=norm, lam=lam, lam_overrides=overrides)
    model = LifelongModel(cfg, method=method)
    for name in "abc":
        model.add_task(name, "pix2pix")
        model.finish_task()
    rows = growth_table(netG, 8, tasks=3, lam=lam, lam_overrides=overrides, norm=norm, method=method)
    for record, row in zip(model.tasks, rows):
        for key in ("new_params", "stored_params", "separate_params", "new_norm_params", "stored_norm_params",
                    "separate_norm_params"):
            assert record[key] == row[key], (record["name"], key)


def test_cli_growth_json_and_table(capsys):
    assert cli.main(["growth", "--netG", "resnet_9blocks", "--ngf", "64", "--tasks", "4", "--lam", "0.25",
                     "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["task"] for r in rows] == [1, 2, 3, 4]
    assert [r["new_params"] for r in rows] == RESNET9["new"]
    assert {"task", "new_params", "stored_params", "separate_params"} <= set(rows[0])
    assert cli.main(["growth", "--netG", "unet_256", "--tasks", "4", "--last-lam", "1.0", "--bias-everywhere"]) == 0
    table = capsys.readouterr().out
    for number in ("15,509,635", "15,984,259", "16,458,883", "47.0 %"):
        assert number in table
    assert cli.main(["growth", "--netG", "unet_256", "--tasks", "2", "--lam-override", "last=1.0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[1]["new_params"] == UNET256["new"][1]
    assert cli.main(["growth", "--netG", "resnet_9blocks", "--tasks", "2", "--cyclegan", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[1]["new_params"] == 2 * RESNET9["new"][1]
