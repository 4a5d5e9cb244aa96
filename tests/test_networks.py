"""Generators and discriminators: junyanz layout and parameter counts (junyanz's)."""
import pytest
import torch
from torch import nn

from piggyback import GeneratorConfig, build_discriminator, build_generator, lifelong
from piggyback.accounting import measure
from piggyback.layers import PIGGYBACK_LAYERS
from piggyback.networks import ResnetBlock, layer_groups, piggyback_layer_names, resolve_layer_lams
from piggyback.norms import TaskBatchNorm2d

pytestmark = pytest.mark.usefixtures("single_thread")


def _task1(cfg):
    net = build_generator(cfg)
    lifelong.add_task(net)
    return net


def _trainable(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("netG, norm, conv_params, norm_params", [
    ("resnet_9blocks", "instance", 11_378_179, 0),
    ("resnet_6blocks", "instance", 7_837_699, 0),
    ("unet_256", "batch", 54_404_099, 9_856),   # 54,413,955 with BatchNorm affine (junyanz)
    ("unet_128", "batch", 41_821_187, 7_808),   # 41,828,995
])
def test_task1_parameter_counts_equal_the_reference(netG, norm, conv_params, norm_params):
    net = _task1(GeneratorConfig(netG=netG, norm=norm, use_dropout=netG.startswith("unet")))
    counts = measure(net)
    assert counts["new_params"] == counts["full_params"] == conv_params
    assert counts["norm_params_per_task"] == norm_params
    assert _trainable(net) == conv_params + norm_params
    assert _trainable(net) == {"resnet_9blocks": 11_378_179, "resnet_6blocks": 7_837_699,
                               "unet_256": 54_413_955, "unet_128": 41_828_995}[netG]


@pytest.mark.parametrize("netD, input_nc, norm, n_layers, expected", [
    ("basic", 3, "instance", 3, 2_764_737),     # CycleGAN PatchGAN
    ("basic", 6, "batch", 3, 2_768_705),        # pix2pix PatchGAN on cat(A, B)
    ("n_layers", 3, "instance", 3, 2_764_737),
])
def test_discriminator_parameter_counts(netD, input_nc, norm, n_layers, expected):
    D = build_discriminator(netD, input_nc, 64, n_layers, norm)
    assert sum(p.numel() for p in D.parameters()) == expected
    assert all(isinstance(m, nn.Conv2d) for m in D.modules() if "Conv" in type(m).__name__)


def test_discriminator_shapes_and_init():
    torch.manual_seed(0)
    D = build_discriminator("basic", 3, ndf=4, norm="batch")
    assert D(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)        # 70x70 PatchGAN
    assert build_discriminator("n_layers", 3, ndf=4, n_layers=2)(torch.randn(1, 3, 64, 64)).shape == (1, 1, 14, 14)
    assert build_discriminator("pixel", 6, ndf=4)(torch.randn(1, 6, 9, 9)).shape == (1, 1, 9, 9)
    D = build_discriminator("basic", 3, ndf=64, norm="batch")
    w = D.model[2].weight
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert torch.equal(D.model[0].bias, torch.zeros(64)) and abs(D.model[3].weight.mean().item() - 1) < 0.01
    with pytest.raises(ValueError, match="netD"):
        build_discriminator("huge", 3)


def test_generator_init_is_normal_002():
    torch.manual_seed(0)
    net = _task1(GeneratorConfig(netG="resnet_9blocks", ngf=64))
    w = net.model[10].conv_block[1].new_filters
    assert abs(w.std().item() - 0.02) < 2e-4 and abs(w.mean().item()) < 2e-4
    assert torch.equal(net.model[1].bias, torch.zeros(64))
    lifelong.add_task(net)
    mix = net.model[10].conv_block[1].mix_weights
    assert mix.shape == (256, 192) and abs(mix.std().item() - 0.02) < 1e-3


def test_resnet_keeps_its_skips_and_junyanz_names():
    """Skips kept (docs/method.md): the public code flattened ResnetBlocks into a plain CNN. Zero conv weights -> identity block."""
    net = _task1(GeneratorConfig(netG="resnet_6blocks", ngf=4))
    names = piggyback_layer_names(net)
    assert names[0] == "model.1" and names[-1] == "model.23" and "model.10.conv_block.5" in names
    assert sum(isinstance(m, ResnetBlock) for m in net.modules()) == 6
    block = net.model[10]
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, PIGGYBACK_LAYERS):
                m.new_filters.zero_()
    x = torch.randn(1, 16, 5, 5)
    assert torch.equal(block(x), x)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 3, 16, 16)


def test_unet_structure_bias_rule_and_dropout():
    net = _task1(GeneratorConfig(netG="unet_128", ngf=4, norm="batch", use_dropout=True))
    names = piggyback_layer_names(net)
    assert len(names) == 14 and names[0] == "model.model.0" and names[-1] == "model.model.3"
    layers = dict(net.named_modules())
    assert [n for n in names if layers[n].has_bias] == ["model.model.3"]   # only the output conv, before Tanh
    assert sum(isinstance(m, nn.Dropout) for m in net.modules()) == 2       # num_downs - 5 middle blocks
    assert sum(isinstance(m, TaskBatchNorm2d) for m in net.modules()) == 11
    assert net(torch.randn(2, 3, 128, 128)).shape == (2, 3, 128, 128)
    inst = _task1(GeneratorConfig(netG="unet_128", ngf=4, norm="instance"))
    assert all(m.has_bias for m in inst.modules() if isinstance(m, PIGGYBACK_LAYERS))


def test_lambda_overrides_apply_by_group_and_name():
    cfg = GeneratorConfig(netG="unet_256", ngf=2, lam=0.5, lam_overrides={"last": 1.0, "model.model.0": 0.75})
    net = build_generator(cfg)
    lams = resolve_layer_lams(cfg, net)
    assert lams["model.model.3"] == 1.0 and lams["model.model.0"] == 0.75
    assert lams["model.model.1.model.1"] == 0.5
    lams = resolve_layer_lams(cfg, net, task_lam=0.25)   # a task's own lambda does not beat a per-layer override
    assert lams["model.model.3"] == 1.0 and lams["model.model.1.model.1"] == 0.25
    # Groups: an exact name beats its group; every layer of a group takes the group's value.
    cfg = GeneratorConfig(netG="resnet_6blocks", ngf=2, lam_overrides={"blocks": 0.5, "model.10.conv_block.1": 0.75,
                                                                        "up": 1.0, "first": None})
    net = build_generator(cfg)
    groups, lams = layer_groups(net), resolve_layer_lams(cfg, net)
    assert [g for g in groups.values()] == ["first", "down", "down"] + ["blocks"] * 12 + ["up", "up", "last"]
    assert lams["model.10.conv_block.1"] == 0.75 and lams["model.10.conv_block.5"] == 0.5
    assert lams["model.16"] == lams["model.19"] == 1.0 and lams["model.1"] == lams["model.23"] == 0.25
    assert cfg.lam_overrides == {"blocks": 0.5, "model.10.conv_block.1": 0.75, "up": 1.0}  # null: not set
    unet = layer_groups(build_generator(GeneratorConfig(netG="unet_128", ngf=2)))
    assert sorted(set(unet.values())) == ["down", "first", "last", "up"]
    with pytest.raises(ValueError, match="lam_overrides.blocks: unet_128 has no layer in group"):
        build_generator(GeneratorConfig(netG="unet_128", ngf=2, lam_overrides={"blocks": 0.5}))
    # A dotted layer name set with `-S +model.lam_overrides.model.26=...` arrives nested.
    assert GeneratorConfig(lam_overrides={"model": {"26": 1.0}}).lam_overrides == {"model.26": 1.0}
    with pytest.raises(ValueError, match="lam_overrides.model.99"):
        build_generator(GeneratorConfig(netG="resnet_6blocks", lam_overrides={"model.99": 0.5}))
    with pytest.raises(ValueError, match="lam"):
        GeneratorConfig(lam=0.0)
    with pytest.raises(ValueError, match="netG"):
        GeneratorConfig(netG="unet_512")


@pytest.mark.parametrize("netG", ["resnet_6blocks", "resnet_9blocks", "unet_128", "unet_256"])
def test_output_layer_default_lambda_one_on_every_generator(netG):
    """The shipped params (and both paper suites) put every generator's output layer at lambda 1.0: at
    task 2 it learns all 3 output filters anew (no mixture of the previous task's 3), every other layer
    takes model.lam."""
    from pathlib import Path

    from piggyback.config import load_params

    root = Path(__file__).resolve().parents[1]
    for path in [root / "params.yaml", *sorted((root / "suites").glob("*.yaml"))]:
        m = load_params(path).model
        cfg = GeneratorConfig(netG=netG, ngf=2, norm=m.norm, lam=m.lam, lam_overrides=m.lam_overrides)
        net = _task1(cfg)
        lifelong.freeze(net)
        lifelong.add_task(net)                                   # task 2, lambdas resolved from net.config
        groups = layer_groups(net)
        layers = {n: l for n, l in net.named_modules() if isinstance(l, PIGGYBACK_LAYERS)}
        last = next(n for n, g in groups.items() if g == "last")
        assert layers[last].new_filters.shape[1 if layers[last].transposed else 0] == 3, path.name
        assert layers[last].mix_weights is None, path.name
        others = [l for n, l in layers.items() if n != last]
        assert all(l.mix_weights is not None for l in others), path.name   # piggybacked at model.lam < 1
