"""Piggyback layers and per-task BatchNorm (docs/method.md, with two of its named fixes)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from piggyback import PiggybackConv2d, PiggybackConvTranspose2d, TaskBatchNorm2d
from piggyback.layers import cheaper_order, compose_weight, num_unconstrained
from piggyback.models import split_call
from piggyback.norms import BatchNorm2d
from piggyback.taskmodule import TaskModule

pytestmark = pytest.mark.usefixtures("single_thread")


def _layer(transposed, cin=5, cout=8, k=3, **kw):
    cls = PiggybackConvTranspose2d if transposed else PiggybackConv2d
    return cls(cin, cout, k, **kw)


def _grow(layer, lams):
    """Add (and freeze) tasks with the given lambdas; the last one stays trainable."""
    for lam in lams:
        layer.add_task(lam)
    return layer


def test_num_unconstrained_is_ceil_without_float_noise():
    assert num_unconstrained(0.25, 64) == 16
    assert num_unconstrained(0.25, 3) == 1      # the ResNet output layer: 1 new, 2 piggyback filters
    assert num_unconstrained(0.1, 30) == 3      # math.ceil(0.1 * 30) would give 4
    assert num_unconstrained(1.0, 7) == 7
    with pytest.raises(ValueError):
        num_unconstrained(0.0, 8)


@pytest.mark.parametrize("stride, padding", [(1, 0), (1, 1), (2, 1), ((2, 1), (0, 2))])
def test_task1_conv_equals_nn_conv2d(stride, padding):
    torch.manual_seed(0)
    pb = _grow(PiggybackConv2d(5, 8, 3, stride=stride, padding=padding), [None])
    ref = nn.Conv2d(5, 8, 3, stride=stride, padding=padding)
    with torch.no_grad():
        ref.weight.copy_(pb.new_filters)
        ref.bias.copy_(torch.randn(8))
        pb.bias.copy_(ref.bias)
    x = torch.randn(2, 5, 11, 9)
    assert torch.equal(pb(x), ref(x))


@pytest.mark.parametrize("stride, padding, output_padding", [(1, 0, 0), (2, 1, 1), (2, 0, 1), (3, 1, 2)])
def test_task1_conv_transpose_equals_nn_conv_transpose2d(stride, padding, output_padding):
    torch.manual_seed(0)
    pb = _grow(PiggybackConvTranspose2d(5, 8, 3, stride=stride, padding=padding, output_padding=output_padding,
                                        bias=False), [None])
    ref = nn.ConvTranspose2d(5, 8, 3, stride=stride, padding=padding, output_padding=output_padding, bias=False)
    with torch.no_grad():
        ref.weight.copy_(pb.new_filters)
    x = torch.randn(2, 5, 7, 6)
    assert torch.equal(pb(x), ref(x))
    assert set(dict(pb.named_parameters())) == {"new_filters"}    # no bias at all when bias=False


@pytest.mark.parametrize("transposed", [False, True])
def test_composed_weight_is_the_design_einsum(transposed):
    torch.manual_seed(0)
    layer = _grow(_layer(transposed), [None, 0.25, 0.5])          # n = 8: m = 2 then 4
    eq = "cnhw,np->cphw" if transposed else "nchw,np->pchw"
    dim = 1 if transposed else 0
    for t, m in ((2, 2), (3, 4)):
        s = layer.task_state(t)
        bank = layer.filter_bank.narrow(dim, 0, layer.bank_rows_before(t))
        expected = torch.cat([s["filters"], torch.einsum(eq, bank, s["mix"])], dim)
        assert s["filters"].shape[dim] == m and s["mix"].shape == (bank.shape[dim], 8 - m)
        torch.testing.assert_close(layer.task_weight(t), expected, rtol=1e-6, atol=1e-7)
    assert layer.bank_rows_before(3) == 8 + 2                     # N_2 = n + m_2


@pytest.mark.parametrize("transposed", [False, True])
def test_piggyback_filters_lie_in_the_span_of_the_bank(transposed):
    """Piggyback filters in the span of the bank (docs/method.md): the public code's raw reshape gives filters outside span(bank); the einsum does not."""
    torch.manual_seed(0)
    layer = _grow(_layer(transposed, cin=6, cout=12, k=3), [None, 0.25, 0.25])
    dim = 1 if transposed else 0
    t = 3
    n_bank, m = layer.bank_rows_before(t), layer.num_new(t)
    as_rows = lambda w: w.transpose(0, 1) if transposed else w            # noqa: E731  (filters first)
    bank = as_rows(layer.filter_bank.narrow(dim, 0, n_bank)).reshape(n_bank, -1).double()   # (N, d)
    pb = as_rows(layer.task_weight(t)).reshape(12, -1)[m:].double()                        # (p, d)
    assert n_bank < bank.shape[1]               # N < d: the span is a proper subspace, the test has teeth
    coef = torch.linalg.lstsq(bank.T, pb.T).solution                                      # (N, p)
    residual = (bank.T @ coef - pb.T).norm() / pb.norm()
    assert residual < 1e-6                      # float32 rounding only
    # The public code's construction for contrast: far from the span.
    raw = (layer.filter_bank.narrow(dim, 0, n_bank).reshape(-1, n_bank) @ layer.task_state(t)["mix"]).double()
    raw = as_rows(raw.reshape(*( (6, -1) if transposed else (-1, 6)), 3, 3)).reshape(-1, bank.shape[1])
    coef = torch.linalg.lstsq(bank.T, raw.T).solution
    assert (bank.T @ coef - raw.T).norm() / raw.norm() > 0.1


@pytest.mark.parametrize("transposed", [False, True])
def test_lambda_one_adds_a_full_task_without_mixing(transposed):
    layer = _grow(_layer(transposed), [None, 1.0])
    assert layer.mix_weights is None and layer.new_filters.shape == layer.weight_shape
    assert torch.equal(layer.task_weight(2), layer.new_filters)
    layer.add_task(0.25)
    keys = set(layer.state_dict())
    assert "mix_2" not in keys and {"filter_bank", "bias_1", "bias_2", "new_filters", "mix_weights", "bias"} <= keys
    assert layer.filter_bank.shape[1 if transposed else 0] == 16 and layer.mix_weights.shape == (16, 6)


def test_state_is_buffers_for_frozen_tasks_and_parameters_for_the_current_one():
    layer = _grow(PiggybackConv2d(4, 8, 3), [None, 0.25, 0.5])
    assert {k: tuple(v.shape) for k, v in layer.named_parameters()} == {
        "new_filters": (4, 4, 3, 3), "mix_weights": (10, 4), "bias": (8,)}
    assert {k: tuple(v.shape) for k, v in layer.named_buffers()} == {
        "filter_bank": (10, 4, 3, 3), "mix_2": (8, 6), "bias_1": (8,), "bias_2": (8,)}
    assert layer.lams == [1.0, 0.25, 0.5] and layer.active_task == 3
    layer.freeze()
    assert not list(layer.parameters()) and layer.filter_bank.shape[0] == 14 and "mix_3" in dict(layer.named_buffers())


@pytest.mark.parametrize("transposed", [False, True])
def test_gradients_reach_only_the_current_task_and_forward_is_pure(transposed):
    torch.manual_seed(0)
    layer = _grow(_layer(transposed), [None, 0.25, 0.25])
    frozen = {k: v.clone() for k, v in layer.named_buffers()}
    attrs = dict(vars(layer))
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        layer(torch.randn(2, 5, 6, 6)).square().mean().backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    assert all(torch.equal(v, frozen[k]) for k, v in layer.named_buffers())
    assert vars(layer).keys() == attrs.keys()   # forward wrote no new attribute (no cached weights)
    before = [layer.task_weight(t).detach().clone() for t in (1, 2)]
    layer.set_task(1)
    with torch.no_grad():
        y1 = layer(torch.ones(1, 5, 4, 4))
    layer.set_task(3)
    assert torch.equal(before[0], layer.task_weight(1)) and torch.equal(before[1], layer.task_weight(2))
    assert y1.shape[1] == 8


def test_freeze_then_thaw_restores_the_trainable_task_exactly():
    torch.manual_seed(0)
    layer = _grow(PiggybackConvTranspose2d(4, 6, 4, stride=2, padding=1), [None, 0.5])
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.freeze()
    layer.thaw()
    assert {k: v for k, v in layer.state_dict().items()}.keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())


def test_compose_weight_without_mix_returns_the_new_filters():
    new = torch.randn(8, 3, 3, 3)
    assert compose_weight(torch.empty(0, 3, 3, 3), None, new, False) is new


def test_forward_without_a_task_is_a_clear_error():
    with pytest.raises(RuntimeError, match="add_task"):
        PiggybackConv2d(3, 4, 3)(torch.zeros(1, 3, 5, 5))
    with pytest.raises(ValueError, match="task 2 does not exist"):
        _grow(PiggybackConv2d(3, 4, 3), [None]).set_task(2)


# -- TaskBatchNorm2d --------------------------------------------------------------------------------------
def test_task_batchnorm_trainable_task_is_exactly_batchnorm2d():
    torch.manual_seed(0)
    tbn, bn = TaskBatchNorm2d(6), nn.BatchNorm2d(6)
    tbn.add_task()
    assert abs(tbn.weight.mean().item() - 1.0) < 0.05 and torch.equal(tbn.bias, torch.zeros(6))
    bn.load_state_dict(tbn.state_dict())
    for _ in range(3):
        x = torch.randn(4, 6, 5, 5) * 3 + 1
        assert torch.equal(tbn(x), bn(x))
    assert all(torch.equal(a, b) for a, b in zip(tbn.state_dict().values(), bn.state_dict().values()))
    tbn.eval(), bn.eval()
    x = torch.randn(2, 6, 5, 5)
    assert torch.equal(tbn(x), bn(x))


def test_task_batchnorm_frozen_task_never_changes_and_comes_back():
    torch.manual_seed(0)
    tbn = TaskBatchNorm2d(3)
    tbn.add_task()
    tbn(torch.randn(8, 3, 4, 4) + 2)            # task 1 learns running statistics
    x = torch.randn(4, 3, 4, 4)
    train_1 = tbn(x)                            # (task 1 is still trainable: this updates its statistics)
    tbn.eval()
    eval_1 = tbn(x)
    tbn.train()
    tbn.add_task()
    frozen = {k: v.clone() for k, v in tbn.named_buffers() if k.endswith("_1")}
    for _ in range(3):
        tbn(torch.randn(8, 3, 4, 4) - 5)        # task 2 trains
    tbn.set_task(1)
    assert torch.equal(tbn(x), train_1)         # train mode: batch statistics, nothing updated
    tbn.eval()
    assert torch.equal(tbn(x), eval_1)
    assert all(torch.equal(v, frozen[k]) for k, v in tbn.named_buffers() if k.endswith("_1"))
    assert tbn.task_state(2)["num_batches_tracked"].item() == 3


def _task_norm(c: int, tasks: int = 1, active: int = 1) -> TaskBatchNorm2d:
    norm = TaskBatchNorm2d(c)
    for _ in range(tasks):
        norm.add_task()
        norm(torch.randn(4, c, 3, 3))          # some running statistics of its own
    norm.set_task(active)
    return norm


@pytest.mark.parametrize("make", [lambda c: BatchNorm2d(c), lambda c: _task_norm(c), lambda c: _task_norm(c, 2, 1)],
                         ids=["BatchNorm2d", "TaskBatchNorm2d", "TaskBatchNorm2d-frozen-task"])
def test_separate_calls_normalise_each_part_as_its_own_call(make):
    """Three calls' batches (sizes 1, 2, 1) in one batch with `calls` set: each part's output, the input
    gradient and the affine gradients equal the three separate calls bit for bit, and the running
    statistics (and the count of batches) are updated part by part, in order, as by the three calls."""
    torch.manual_seed(0)
    batched = make(5)
    separate = copy.deepcopy(batched)
    parts = [torch.randn(n, 5, 4, 4) * (i + 1) + i for i, n in enumerate((1, 2, 1))]
    xs = [p.clone().requires_grad_() for p in parts]
    x = torch.cat(parts).requires_grad_()
    weights = [torch.randn(p.shape) for p in parts]
    batched.calls = (1, 2, 1)
    y = batched(x)
    (y * torch.cat(weights)).sum().backward()
    ys = [separate(p) for p in xs]
    sum((yi * wi).sum() for yi, wi in zip(ys, weights)).backward()
    assert torch.equal(y, torch.cat(ys))
    assert torch.equal(x.grad, torch.cat([p.grad for p in xs]))
    for (name, a), b in zip(batched.named_parameters(), separate.parameters()):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(batched.named_buffers(), separate.buffers()):
        assert torch.equal(a, b), name


def test_separate_calls_only_in_train_mode_and_only_for_matching_sizes():
    torch.manual_seed(0)
    norm = BatchNorm2d(3)
    norm(torch.randn(6, 3, 4, 4))
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(norm.state_dict())       # the same state dict as nn.BatchNorm2d
    norm.calls = (2, 2)
    with pytest.raises(ValueError, match=r"batch of 3 does not split into the calls \[2, 2\]"):
        norm(torch.randn(3, 3, 4, 4))
    norm.eval(), plain.eval()
    x = torch.randn(4, 3, 4, 4)
    assert torch.equal(norm(x), plain(x))          # eval: running statistics, per-sample already


def test_split_call_restores_the_norms_even_when_the_call_fails():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    a, b = torch.randn(1, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out_a, out_b = split_call(net, a, b)
    assert out_a.shape == (1, 2, 4, 4) and out_b.shape == (2, 2, 4, 4) and net[1].calls is None
    with pytest.raises(RuntimeError):                    # 5 channels: the first convolution fails
        split_call(net, torch.randn(1, 5, 4, 4), torch.randn(2, 5, 4, 4))
    assert net[1].calls is None


@pytest.fixture
def order():
    """Force the forward order of every piggyback layer; restored afterwards."""
    from piggyback.layers import _PiggybackConvNd
    yield lambda value: setattr(_PiggybackConvNd, "order", value)
    _PiggybackConvNd.order = "auto"


@pytest.mark.parametrize("transposed", [False, True])
def test_both_forward_orders_compute_the_same_map_and_gradients(transposed, order):
    torch.manual_seed(0)
    layer = _grow(_layer(transposed, cin=6, cout=12, k=4, stride=2, padding=1), [None, 0.25, 0.5])
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    got = {}
    for name in ("compose", "mix_outputs"):
        order(name)
        x.grad = None
        layer.zero_grad()
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        got[name] = [y.detach(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    for a, b in zip(got["compose"], got["mix_outputs"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    weight, bias = layer.task_weight(3), layer.task_state(3).get("bias")
    conv = F.conv_transpose2d if transposed else F.conv2d
    torch.testing.assert_close(got["mix_outputs"][0], conv(x, weight, bias, 2, 1).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("transposed", [False, True])
def test_auto_order_mixes_outputs_only_where_the_map_is_small(transposed):
    layer = _grow(_layer(transposed, cin=256, cout=256, k=4, stride=2, padding=1), [None, 0.25, 0.25])
    n_bank, p = layer.mix_weights.shape
    assert layer.order_for(torch.empty(1, 256, 2, 2), n_bank, p) == "mix_outputs"    # U-Net bottleneck
    assert layer.order_for(torch.empty(1, 256, 128, 128), n_bank, p) == "compose"  # outer layer


@pytest.mark.parametrize("transposed", [False, True])
def test_frozen_tasks_stay_bit_exact_in_the_mix_outputs_order(transposed, order):
    order("mix_outputs")
    torch.manual_seed(0)
    layer = _grow(_layer(transposed), [None, 0.25, 0.5])
    x = torch.randn(2, 5, 6, 6)
    with torch.no_grad():
        before = [layer.set_task(t) or layer(x) for t in (2, 3)]
        layer.add_task(0.25)
        layer.add_task(0.75)
        after = [layer.set_task(t) or layer(x) for t in (2, 3)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_cheaper_order_is_the_documented_cost_model():
    """compose = p*N*d + n*c, mix outputs = (m + N)*c + p*N*o (docs/method.md); ties go to composing."""
    n, p, n_bank, d = 8, 6, 8, 27                                   # compose = 1296 + 8c, mix = 10c + 48o
    assert cheaper_order(n, p, n_bank, d, per_filter=100, out_pixels=10) == "mix_outputs"   # 2096 vs 1480
    assert cheaper_order(n, p, n_bank, d, per_filter=1000, out_pixels=10) == "compose"      # 9296 vs 10480
    assert cheaper_order(n, p, n_bank, d, per_filter=480, out_pixels=7) == "compose"        # 5136 vs 5136


def test_task_bookkeeping_is_written_once():
    """Layers and per-task norms share one implementation of the task operations and the state accessor."""
    for cls in (PiggybackConv2d, PiggybackConvTranspose2d, TaskBatchNorm2d):
        assert issubclass(cls, TaskModule)
        for name in ("add_task", "freeze", "thaw", "set_task", "task_state"):
            assert getattr(cls, name) is getattr(TaskModule, name), f"{cls.__name__}.{name}"
    with pytest.raises(ValueError, match="needs its lambda"):
        _grow(PiggybackConv2d(3, 4, 3), [None, None])

