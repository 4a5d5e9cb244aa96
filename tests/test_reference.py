"""Importing junyanz/pytorch-CycleGAN-and-pix2pix generators as task 1.

The reference networks below are a small plain-PyTorch re-statement of junyanz's ResnetGenerator and
UnetGenerator module structure, written for this test so that their state-dict keys are exactly
junyanz's (`model.1.weight`, `model.10.conv_block.1.weight`, `model.model.1.model.3.model...`).
"""
import functools

import pytest
import torch
from torch import nn

import piggyback
from piggyback import cli
from piggyback.checkpoint import load_lifelong
from piggyback.reference import ReferenceImportError, import_reference_model

pytestmark = pytest.mark.usefixtures("single_thread")


# -- plain reference networks (junyanz module layout) ---------------------------------------------------
def _norm(kind):
    if kind == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
    return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)


class RefResnetBlock(nn.Module):
    def __init__(self, dim, norm, dropout, bias):
        super().__init__()
        seq = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), norm(dim), nn.ReLU(True)]
        seq += [nn.Dropout(0.5)] if dropout else []
        seq += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), norm(dim)]
        self.conv_block = nn.Sequential(*seq)

    def forward(self, x):
        return x + self.conv_block(x)


class RefResnetGenerator(nn.Module):
    def __init__(self, ngf, n_blocks, kind="instance", dropout=False, inc=3, outc=3):
        super().__init__()
        norm, bias = _norm(kind), kind == "instance"
        seq = [nn.ReflectionPad2d(3), nn.Conv2d(inc, ngf, 7, bias=bias), norm(ngf), nn.ReLU(True)]
        for mult in (1, 2):
            seq += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, 2, 1, bias=bias), norm(ngf * mult * 2), nn.ReLU(True)]
        seq += [RefResnetBlock(ngf * 4, norm, dropout, bias) for _ in range(n_blocks)]
        for mult in (4, 2):
            seq += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, 2, 1, output_padding=1, bias=bias),
                    norm(ngf * mult // 2), nn.ReLU(True)]
        seq += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, outc, 7), nn.Tanh()]
        self.model = nn.Sequential(*seq)

    def forward(self, x):
        return self.model(x)


class RefUnetBlock(nn.Module):
    def __init__(self, outer, inner, inc=None, sub=None, outermost=False, innermost=False, kind="batch",
                 dropout=False):
        super().__init__()
        self.outermost = outermost
        norm, bias = _norm(kind), kind == "instance"
        inc = outer if inc is None else inc
        down = nn.Conv2d(inc, inner, 4, 2, 1, bias=bias)
        if outermost:
            seq = [down, sub, nn.ReLU(True), nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1), nn.Tanh()]
        elif innermost:
            seq = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True), nn.ConvTranspose2d(inner, outer, 4, 2, 1, bias=bias),
                   norm(outer)]
        else:
            seq = [nn.LeakyReLU(0.2, True), down, norm(inner), sub, nn.ReLU(True),
                   nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1, bias=bias), norm(outer)]
            seq += [nn.Dropout(0.5)] if dropout else []
        self.model = nn.Sequential(*seq)

    def forward(self, x):
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class RefUnetGenerator(nn.Module):
    def __init__(self, num_downs, ngf, kind="batch", dropout=True, inc=3, outc=3):
        super().__init__()
        b = RefUnetBlock(ngf * 8, ngf * 8, innermost=True, kind=kind)
        for _ in range(num_downs - 5):
            b = RefUnetBlock(ngf * 8, ngf * 8, sub=b, kind=kind, dropout=dropout)
        for outer, inner in ((4, 8), (2, 4), (1, 2)):
            b = RefUnetBlock(ngf * outer, ngf * inner, sub=b, kind=kind)
        self.model = RefUnetBlock(outc, ngf, inc=inc, sub=b, outermost=True, kind=kind)

    def forward(self, x):
        return self.model(x)


def _randomise(net, seed):
    """Weights far from init (so a wrong wiring shows) and non-trivial BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.dtype != torch.float32:
                t.fill_(7)                      # num_batches_tracked
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.15)
    return net.eval()


# -- tests ----------------------------------------------------------------------------------------------
def test_reference_networks_have_junyanz_keys_and_counts():
    r9 = RefResnetGenerator(64, 9)
    assert sum(p.numel() for p in r9.parameters()) == 11_378_179            # junyanz's ResnetGenerator, 9 blocks
    keys = set(r9.state_dict())
    assert {"model.1.weight", "model.1.bias", "model.10.conv_block.1.weight", "model.10.conv_block.5.bias",
            "model.19.weight", "model.26.weight"} <= keys
    keys = set(RefUnetGenerator(8, 4).state_dict())
    assert {"model.model.0.weight", "model.model.1.model.1.weight", "model.model.1.model.2.running_mean",
            "model.model.1.model.3.model.3.model.3.model.3.model.3.model.3.model.3.weight",
            "model.model.3.weight", "model.model.3.bias"} <= keys


@pytest.mark.parametrize("netG, ngf, side, ref", [
    ("resnet_9blocks", 4, 32, lambda: RefResnetGenerator(4, 9)),
    ("resnet_6blocks", 8, 24, lambda: RefResnetGenerator(8, 6, dropout=True)),
    ("unet_128", 4, 128, lambda: RefUnetGenerator(7, 4)),
    ("unet_256", 2, 256, lambda: RefUnetGenerator(8, 2)),
])
def test_import_reproduces_reference_outputs(tmp_path, netG, ngf, side, ref):
    torch.manual_seed(0)
    reference = _randomise(ref(), seed=1)
    sd = reference.state_dict()
    if netG.startswith("resnet"):               # a pre-0.4 file: stale InstanceNorm buffers to drop
        sd.update({"model.2.running_mean": torch.zeros(ngf), "model.2.running_var": torch.ones(ngf),
                   "model.10.conv_block.2.num_batches_tracked": torch.tensor(3)})
    path = tmp_path / "latest_net_G.pth"
    torch.save({"module." + k: v for k, v in sd.items()}, path)      # DataParallel-wrapped keys
    net = piggyback.import_reference(path, netG=netG, ngf=ngf)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        expected, got = reference(x), net(x)
    assert (got - expected).abs().max().item() <= 1e-5
    assert expected.std() > 0.05                # the comparison is not between near-constant images


def test_import_errors_name_the_key():
    sd = _randomise(RefResnetGenerator(4, 6), seed=2).state_dict()
    with pytest.raises(ReferenceImportError, match=r"unexpected key 'model.99.weight'"):
        import_reference_model({"G_A": {**sd, "model.99.weight": torch.zeros(1)}}, netG="resnet_6blocks", ngf=4)
    missing = {k: v for k, v in sd.items() if k != "model.23.bias"}
    with pytest.raises(ReferenceImportError, match=r"missing key 'model.23.bias'"):
        import_reference_model({"G_A": missing}, netG="resnet_6blocks", ngf=4)
    with pytest.raises(ReferenceImportError, match=r"'model.1.weight' has shape \(4, 3, 7, 7\)"):
        import_reference_model({"G_A": sd}, netG="resnet_6blocks", ngf=8)
    with pytest.raises(ReferenceImportError, match="missing key 'model.16.conv_block.1.weight'"):
        import_reference_model({"G_A": sd}, netG="resnet_9blocks", ngf=4)


def test_cli_import_reference_writes_a_lifelong_checkpoint(tmp_path):
    torch.manual_seed(0)
    ref_a, ref_b = _randomise(RefResnetGenerator(4, 6), 3), _randomise(RefResnetGenerator(4, 6), 4)
    torch.save(ref_a.state_dict(), tmp_path / "latest_net_G_A.pth")
    torch.save(ref_b.state_dict(), tmp_path / "latest_net_G_B.pth")
    out = tmp_path / "models" / "pretrained"
    rc = cli.main(["import-reference", str(tmp_path / "latest_net_G_A.pth"), "--path-B",
                   str(tmp_path / "latest_net_G_B.pth"), "--netG", "resnet_6blocks", "--ngf", "4", "--out", str(out)])
    assert rc == 0
    model = load_lifelong(out)
    assert model.task_names() == ["pretrained"] and model.tasks[0]["mode"] == "cyclegan"
    assert model.tasks[0]["stored_params"] == 2 * model.tasks[0]["params"]["G_A"]["full_params"]
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert (model.generator("pretrained", "G_A")(x) - ref_a(x)).abs().max() <= 1e-5
        assert (model.generator("pretrained", "G_B")(x) - ref_b(x)).abs().max() <= 1e-5
    # The imported model goes on learning: a second task leaves the pretrained one intact.
    model.add_task("next", "cyclegan")
    model.finish_task()
    with torch.no_grad():
        assert (model.generator("pretrained", "G_A")(x) - ref_a(x)).abs().max() <= 1e-5
    assert cli.main(["import-reference", str(tmp_path / "latest_net_G_A.pth"), "--netG", "resnet_6blocks",
                     "--ngf", "4", "--out", str(out)]) == 2          # never overwrites a finished folder
