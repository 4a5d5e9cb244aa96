"""LifelongModel: zero forgetting by construction, the two baselines, materialised inference."""
import pytest
import torch
from torch import nn

from piggyback import GeneratorConfig, LifelongModel, lifelong
from piggyback.accounting import full_params, measure

pytestmark = pytest.mark.usefixtures("single_thread")

RESNET = GeneratorConfig(netG="resnet_6blocks", ngf=4, norm="instance", use_dropout=True)
UNET = GeneratorConfig(netG="unet_128", ngf=4, norm="batch", use_dropout=True)
SIZE = {"resnet_6blocks": 16, "unet_128": 128}


def _train(model, nets, size, steps=3):
    """A few Adam steps on random data; checks that only the current task's tensors can change."""
    frozen = {(w, k): v.clone() for w, net in model.generators.items() for k, v in net.named_buffers()
              if not k.split(".")[-1] in ("running_mean", "running_var", "num_batches_tracked")}
    params = [p for net in nets.values() for p in lifelong.task_parameters(net)]
    assert params == [p for net in nets.values() for p in net.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum((net(torch.randn(2, 3, size, size)) - 0.3).square().mean() for net in nets.values())
        loss.backward()
        assert all(p.grad is not None for p in params)
        opt.step()
    for (w, k), v in frozen.items():            # banks, earlier tasks' mixes/biases/norm state: untouched
        assert torch.equal(dict(model.generators[w].named_buffers())[k], v), (w, k)


def _outputs(model, x):
    """Every (task, generator) output in eval mode and in train mode (same dropout seed)."""
    out = {}
    for record in model.tasks:
        for which in record["index"]:
            net = model.generator(record["name"], which)
            with torch.no_grad():
                out[record["name"], which, "eval"] = net(x)
                net.train()
                torch.manual_seed(123)
                out[record["name"], which, "train"] = net(x)
            net.eval()
    return out


@pytest.mark.parametrize("cfg, mode", [(RESNET, "cyclegan"), (UNET, "pix2pix")])
def test_no_forgetting_after_two_more_tasks(cfg, mode):
    torch.manual_seed(0)
    size = SIZE[cfg.netG]
    x = torch.randn(2, 3, size, size)
    model = LifelongModel(cfg)
    saved = {}
    for name in ("t1", "t2", "t3"):
        nets = model.add_task(name, mode, dataset=name)
        _train(model, nets, size)
        model.finish_task(epochs=1)
        now = _outputs(model, x)
        for key, value in saved.items():        # every earlier output, bit for bit
            assert torch.equal(now[key], value), key
        saved = now
    assert len(saved) == 3 * len(model.tasks[0]["index"]) * 2
    assert not torch.equal(saved["t1", "G_A", "eval"], saved["t3", "G_A", "eval"])
    if cfg.norm == "batch":                     # train mode really uses batch statistics
        assert not torch.equal(saved["t1", "G_A", "eval"], saved["t1", "G_A", "train"])


def test_materialized_network_is_plain_and_gives_the_same_outputs():
    torch.manual_seed(0)
    model = LifelongModel(UNET)
    for name in ("a", "b"):
        _train(model, model.add_task(name, "pix2pix"), 128, steps=1)
        model.finish_task()
    x = torch.randn(1, 3, 128, 128)
    for name in ("a", "b"):
        dense = model.materialize(name)
        kinds = {type(m) for m in dense.modules()}
        assert {nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d} <= kinds
        assert not any("Piggyback" in k.__name__ or "Task" in k.__name__ for k in kinds)
        assert not dense.training and sum(b.numel() for n, b in dense.named_buffers() if "filter_bank" in n) == 0
        with torch.no_grad():
            assert torch.equal(dense(x), model.generator(name)(x))
    assert lifelong.materialize(model.generators["G_A"], 1).materialized_task == 1


def test_mixed_suite_banks_and_records():
    torch.manual_seed(0)
    model = LifelongModel(RESNET)
    for name, mode in (("p1", "pix2pix"), ("c2", "cyclegan"), ("p3", "pix2pix")):
        nets = model.add_task(name, mode, direction="BtoA", dataset=name, lam=0.5 if name == "p3" else None)
        assert sorted(nets) == (["G_A", "G_B"] if mode == "cyclegan" else ["G_A"])
        model.finish_task(mlflow_run_id=f"run-{name}")
    assert [r["index"] for r in model.tasks] == [{"G_A": 1}, {"G_A": 2, "G_B": 1}, {"G_A": 3}]
    assert lifelong.num_tasks(model.generators["G_A"]) == 3 and lifelong.num_tasks(model.generators["G_B"]) == 1
    p3 = model.task("p3")
    assert p3["lam"] == 0.5 and set(p3["lambda"]["G_A"].values()) == {0.5} and p3["mlflow_run_id"] == "run-p3"
    assert set(model.task("p1")["lambda"]["G_A"].values()) == {1.0}   # task 1: all filters unconstrained
    full = full_params(model.generators["G_A"])
    assert p3["separate_params"] == 4 * full    # p1 (1 G) + c2 (2 G) + p3 (1 G)
    assert p3["stored_params"] == measure(model.generators["G_A"])["stored_params"] + full
    c2 = model.task("c2")["params"]
    assert c2["G_B"]["new_params"] == full > c2["G_A"]["new_params"]          # G_B's task 1 vs G_A's task 2
    assert model.task("c2")["new_params"] == c2["G_A"]["new_params"] + c2["G_B"]["new_params"]
    assert all(len(h) == 64 for r in model.tasks for h in r["hashes"].values())
    with pytest.raises(KeyError, match="has no G_B"):
        model.generator("p1", "G_B")
    with pytest.raises(ValueError, match="already used"):
        model.add_task("p1", "pix2pix")
    with pytest.raises(ValueError, match="reserved"):
        model.add_task("p4", "pix2pix")
        model.finish_task(hashes="x")


def test_separate_baseline_stores_a_full_generator_per_task():
    model = LifelongModel(RESNET, method="separate")
    for name in ("a", "b", "c"):
        model.add_task(name, "pix2pix")
        model.finish_task()
    full = full_params(model.generators["G_A"])
    assert [r["new_params"] for r in model.tasks] == [full] * 3
    assert model.tasks[-1]["stored_params"] == model.tasks[-1]["separate_params"] == 3 * full
    assert set(model.task("c")["lambda"]["G_A"].values()) == {1.0}


def test_finetune_baseline_warm_starts_one_slot():
    torch.manual_seed(0)
    model = LifelongModel(RESNET, method="finetune")
    _train(model, model.add_task("a", "cyclegan"), 16, steps=1)
    model.finish_task()
    before = lifelong.task_state(model.generators["G_A"], 1)
    before = {k: v.clone() for k, v in before.items()}
    nets = model.add_task("b", "pix2pix")       # re-trains G_A's single slot, warm-started
    assert all(torch.equal(v, before[k]) for k, v in lifelong.task_state(nets["G_A"], 1).items())
    _train(model, nets, 16, steps=1)
    model.finish_task()
    full = full_params(model.generators["G_A"])
    assert model.task("b")["index"] == {"G_A": 1} and model.task("a")["overwritten_by"] == {"G_A": "b"}
    assert model.task("b")["new_params"] == full and model.task("b")["stored_params"] == 2 * full   # G_A + G_B
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.generator("a")(x), model.generator("b")(x))


def test_add_task_requires_the_previous_one_finished():
    model = LifelongModel(RESNET)
    model.add_task("a", "pix2pix")
    with pytest.raises(RuntimeError, match="not finished"):
        model.add_task("b", "pix2pix")
    with pytest.raises(ValueError, match="mode"):
        LifelongModel(RESNET).add_task("a", "cycle")


def test_reuse_composed_weights_composes_once_with_the_same_gradients(monkeypatch):
    from piggyback.layers import PiggybackConv2d

    torch.manual_seed(0)
    model = LifelongModel(RESNET)
    model.add_task("a", "pix2pix")
    model.finish_task()
    model.add_task("b", "pix2pix")
    net = model.generators["G_A"]
    x = torch.randn(2, 3, 32, 32)
    calls = []
    original = PiggybackConv2d.task_weight
    monkeypatch.setattr(PiggybackConv2d, "task_weight", lambda self, t: calls.append(t) or original(self, t))

    def three_calls_then_backward():
        net.zero_grad(set_to_none=True)
        calls.clear()
        torch.manual_seed(1)                    # the same dropout masks in both runs
        y = net(x)
        (net(y).abs().mean() + net(x.flip(-1)).square().mean()).backward()
        return [p.grad.clone() for p in net.parameters()], len(calls)

    per_call, n_per_call = three_calls_then_backward()
    with lifelong.reuse_composed_weights(net):
        shared, n_shared = three_calls_then_backward()
    convs = sum(isinstance(m, PiggybackConv2d) for m in net.modules())
    assert n_per_call == 3 * convs and n_shared == convs
    for a, b in zip(per_call, shared):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all(m._weight_cache is None for m in net.modules() if isinstance(m, PiggybackConv2d))
