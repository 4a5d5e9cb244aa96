"""DDP: a 2-process torchrun (gloo) run equals a 1-process run with the same global batch; replicas agree."""
import json
import textwrap

import pytest
import torch

from piggyback.checkpoint import load_lifelong, load_probes
from piggyback.networks import GeneratorConfig, build_generator, piggyback_layer_names
from piggyback.probes import run_probe
from train_helpers import (PY, generators, make_data, max_abs_diff, run_cmd, run_init, run_train, single_thread,  # noqa: F401
                           stage_cmd, write_params)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    data = make_data(tmp_path, ["daynight"])
    tasks = {"t1": {"dataset": "daynight", "prev": "init", "mode": "cyclegan"}}
    # Same global batch (2) and steps; pool (50) not yet full, instance norm: per-sample maths only.
    # Seed 1: measured max |2-process - 1-process| of the outputs 1.8e-6 / 1.9e-6 / 3.9e-6 for seeds 1 / 2 / 3
    # (2.4e-6 / 2.4e-6 / 3.4e-6 before CycleGAN's generator calls took junyanz's order), but 1.95e-4 for
    # seed 0 (1.4e-5 before; weights 8.3e-6 vs 2.4e-7): at that seed a change in the order of float sums
    # is amplified 100-fold in 3 Adam steps, which measures that seed, not DDP. A DDP fault (a rank's
    # gradient not averaged) moves every weight by up to lr = 2e-4, 20x the bound below.
    p2 = write_params(tmp_path / "p2.yaml", tasks, train={"batch_size": 1, "max_steps": 3}, seed=1)
    p1 = write_params(tmp_path / "p1.yaml", tasks, train={"batch_size": 2, "max_steps": 3}, seed=1)
    for p, m in ((p2, "m2"), (p1, "m1")):
        run_init(p, tmp_path / m)
    out = run_cmd(stage_cmd("t1", p2, tmp_path / "m2", data, tmp_path / "metrics2", nproc=2), tmp_path)
    assert "train@t1: 3 steps" in out.stdout
    run_train("t1", p1, tmp_path / "m1", data, tmp_path / "metrics1")

    s2 = json.loads((tmp_path / "metrics2" / "train" / "t1.json").read_text())
    s1 = json.loads((tmp_path / "metrics1" / "train" / "t1.json").read_text())
    assert (s2["world_size"], s2["global_batch"], s2["replicas_agree"]) == (2, 2, True)   # ranks hold equal weights
    assert (s1["world_size"], s1["global_batch"], s1["steps"]) == (1, 2, 3)

    # Biases of convs followed by InstanceNorm(affine=False) (all but the last layer's, as in junyanz) have
    # a gradient that is zero in exact arithmetic; Adam turns its rounding noise into +-lr steps, so
    # those values differ between any two summation orders without changing a single output. Compare
    # every other tensor, and the outputs of both networks.
    last = piggyback_layer_names(build_generator(GeneratorConfig(netG="resnet_6blocks", ngf=4)))[-1]
    cancelled = lambda k: k.endswith(".bias_1") and not k.startswith(last + ".")  # noqa: E731
    g2, g1 = generators(tmp_path / "m2" / "t1"), generators(tmp_path / "m1" / "t1")
    keep = lambda g: {w: {k: v for k, v in sd.items() if not cancelled(k)} for w, sd in g.items()}  # noqa: E731
    diff = max_abs_diff(keep(g2), keep(g1))
    m2, m1 = load_lifelong(tmp_path / "m2" / "t1"), load_lifelong(tmp_path / "m1" / "t1")
    x = load_probes(tmp_path / "m1" / "t1")["t1"]
    out_diff = max((run_probe(m2.generator("t1", w), x[w]["input"]) - run_probe(m1.generator("t1", w), x[w]["input"]))
                   .abs().max().item() for w in ("G_A", "G_B"))
    print(f"max |2-process - 1-process|: weights {diff:.2e}, outputs {out_diff:.2e}")
    assert diff <= 1e-5          # measured ~2e-7 on CPU
    assert out_diff <= 1e-4      # outputs see the cancelled biases' rounding too (~1e-5 through 20 layers)
    # ... and training did move the weights (not a comparison of two initialisations).
    torch.manual_seed(0)
    fresh = load_lifelong(tmp_path / "m1" / "init")
    fresh.add_task("t1", "cyclegan")
    moved = (run_probe(fresh.generators["G_A"], x["G_A"]["input"]) - x["G_A"]["output"]).abs().max().item()
    assert moved > 1e-3
    for k in ("G", "D_A", "cycle_B"):
        assert abs(s2["final_losses"][k] - s1["final_losses"][k]) < 1e-4


@pytest.mark.slow
def test_replica_check_detects_unsynchronised_gradients(tmp_path):
    """Calling `.module` (docs/method.md, "DDP bypass") leaves replicas apart; the check before saving must catch it."""
    script = tmp_path / "b4.py"
    script.write_text(textwrap.dedent("""
        import torch
        from torch.nn.parallel import DistributedDataParallel as DDP
        from piggyback import distributed as D
        rank, _, world, device = D.init_distributed()
        torch.manual_seed(0)
        net = DDP(torch.nn.Linear(4, 1))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        x = torch.randn(8, 4)[rank::world]
        net(x).pow(2).mean().backward(); opt.step(); opt.zero_grad()          # synchronised
        assert D.check_replicas_agree({"net": net})
        net.module(x).pow(2).mean().backward(); opt.step()                      # bypasses DDP
        try:
            D.check_replicas_agree({"net": net})
        except RuntimeError as e:
            D.print0("CAUGHT:", e)
        D.cleanup()
    """))
    out = run_cmd([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)], tmp_path)
    assert "CAUGHT: DDP replicas disagree on net parameters" in out.stdout


_AVERAGE = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch import nn
    from piggyback import distributed as D
    from piggyback.norms import TaskBatchNorm2d

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    net = nn.Sequential(TaskBatchNorm2d(3))
    net[0].add_task(); net[0].add_task(0.25)                # task 1 frozen, task 2 trainable
    frozen = {n: b.clone() for n, b in net.named_buffers() if n.endswith("_1")}
    with torch.no_grad():
        net[0].running_mean.fill_(float(rank + 1)); net[0].running_var.fill_(float(10 * (rank + 1)))
    D.average_running_stats([net])
    ok = torch.equal(net[0].running_mean, torch.full((3,), 1.5)) and torch.equal(net[0].running_var, torch.full((3,), 15.0))
    ok = ok and all(torch.equal(b, frozen[n]) for n, b in net.named_buffers() if n in frozen) and len(frozen) >= 2
    print("OK" if ok else f"BAD {dict(net.named_buffers())}")
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_batchnorm_statistics_are_averaged_over_ranks(tmp_path):
    """The trainable task's running stats become the mean over ranks; frozen tasks' stay as they were."""
    script = tmp_path / "average.py"
    script.write_text(_AVERAGE)
    out = run_cmd([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)], tmp_path)
    assert out.stdout.count("OK") == 2, out.stdout + out.stderr
