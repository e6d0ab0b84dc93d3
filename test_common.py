"""The mathematics of common.py: each test fails when the thing it names is broken."""
import math

import pytest
import torch
import torch.nn as nn

from common import (FeatureDistiller, correlation_distance, log_sum_exp_distance, make_norm, make_projector,
                    projector_spectrum)


def naive_log_sum(a, b, alpha):
    """The paper's formula as the official code writes it: log sum |a - b| ** alpha."""
    return torch.log((a - b).abs().pow(alpha).sum())


def reference_and_grads(a, b, alpha):
    """Value and gradients of the formula in float64, the ground truth."""
    a64 = a.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    value = naive_log_sum(a64, b64, alpha)
    value.backward()
    return value.detach(), a64.grad, b64.grad


def value_and_grads(fn, a, b, **kwargs):
    a = a.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    value = fn(a, b, **kwargs)
    value.backward()
    return value.detach(), a.grad, b.grad


def assert_finite(*tensors):
    for t in tensors:
        assert torch.isfinite(t).all(), t


# --- log_sum_exp_distance ---------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [1.0, 2.0, 4.0, 5.0])
def test_log_sum_equals_formula_and_its_gradient(alpha):
    torch.manual_seed(0)
    a, b = torch.randn(16, 32), torch.randn(16, 32)
    value, grad_a, grad_b = value_and_grads(log_sum_exp_distance, a, b, alpha=alpha)
    ref, ref_a, ref_b = reference_and_grads(a, b, alpha)
    assert value.dtype == torch.float32 and value.dim() == 0
    torch.testing.assert_close(value.double(), ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad_a.double(), ref_a, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grad_b.double(), ref_b, rtol=1e-4, atol=1e-7)


def test_log_sum_sums_over_batch_and_feature_dims():
    a, b = torch.zeros(2, 3), torch.zeros(2, 3)
    b[0, 0], b[1, 2] = 1.0, 2.0          # |d|**4 = 1 + 16
    torch.testing.assert_close(log_sum_exp_distance(a, b, alpha=4.0), torch.tensor(math.log(17.0)))


def test_log_sum_some_differences_exactly_zero():
    torch.manual_seed(0)
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    b[:4] = a[:4]                         # half the rows agree exactly
    value, grad_a, grad_b = value_and_grads(log_sum_exp_distance, a, b)
    assert_finite(value, grad_a, grad_b)
    ref, ref_a, _ = reference_and_grads(a, b, 4.0)
    torch.testing.assert_close(value.double(), ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad_a.double(), ref_a, rtol=1e-4, atol=1e-7)
    assert (grad_a[:4] == 0).all()        # no pull where student and teacher agree


@pytest.mark.parametrize("alpha", [1.0, 4.0])
def test_log_sum_all_differences_zero_is_finite(alpha):
    a = torch.randn(4, 8)
    value, grad_a, grad_b = value_and_grads(log_sum_exp_distance, a, a.clone(), alpha=alpha)
    assert_finite(value, grad_a, grad_b)
    assert (grad_a == 0).all() and (grad_b == 0).all()
    # Below the distance of a single tiny non-zero difference.
    tiny = torch.zeros(4, 8)
    tiny[0, 0] = 1e-30
    assert value < log_sum_exp_distance(tiny, torch.zeros(4, 8), alpha=alpha)


@pytest.mark.parametrize("scale,alpha", [(1e4, 4.0), (1e8, 4.0), (1e8, 5.0), (1e12, 4.0), (1e-12, 4.0)])
def test_log_sum_huge_and_tiny_differences(scale, alpha):
    torch.manual_seed(0)
    a, b = torch.randn(32, 64) * scale, torch.randn(32, 64) * scale
    value, grad_a, grad_b = value_and_grads(log_sum_exp_distance, a, b, alpha=alpha)
    ref, ref_a, _ = reference_and_grads(a, b, alpha)
    assert_finite(value, grad_a, grad_b)
    torch.testing.assert_close(value.double(), ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(grad_a.double() * scale, ref_a * scale, rtol=1e-4, atol=1e-6)


def test_naive_formula_breaks_where_ours_does_not():
    # The reason for the factoring: the official code's form overflows and underflows in float32.
    a = torch.randn(32, 64)
    assert naive_log_sum(a * 1e8, torch.zeros_like(a), 5.0).isinf()
    assert naive_log_sum(a * 1e-12, torch.zeros_like(a), 4.0).isinf()
    assert torch.isfinite(log_sum_exp_distance(a * 1e8, torch.zeros_like(a), 5.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_log_sum_low_precision_inputs(dtype):
    torch.manual_seed(0)
    a, b = torch.randn(16, 32).to(dtype), torch.randn(16, 32).to(dtype)
    b[0] = a[0]
    value, grad_a, grad_b = value_and_grads(log_sum_exp_distance, a, b)
    assert value.dtype == torch.float32
    assert grad_a.dtype == dtype
    assert_finite(value, grad_a.float(), grad_b.float())
    ref, _, _ = reference_and_grads(a, b, 4.0)   # the same rounded inputs, in float64
    torch.testing.assert_close(value.double(), ref, rtol=1e-6, atol=1e-5)


def test_log_sum_under_autocast():
    torch.manual_seed(0)
    a, b = torch.randn(16, 32) * 300, torch.randn(16, 32) * 300
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = log_sum_exp_distance(a, b)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), reference_and_grads(a, b, 4.0)[0], rtol=1e-6, atol=1e-5)


# --- correlation_distance ---------------------------------------------------------------------

def test_correlation_distance_equals_formula():
    torch.manual_seed(0)
    a, b = torch.randn(64, 16).double(), torch.randn(64, 16).double()
    c = (a * b).sum(0) / a.shape[0]
    expected = torch.log(((c - 1).abs() ** 3.0).sum() + 1e-5)
    torch.testing.assert_close(correlation_distance(a, b, alpha=3.0).double(), expected, rtol=1e-5, atol=1e-6)


def test_correlation_distance_is_minimal_for_identical_normalised_features():
    torch.manual_seed(0)
    z = make_norm(32, "bn").train()(torch.randn(256, 32) * 5 + 3)   # batch-normalised: mean 0, variance 1
    at_minimum = correlation_distance(z, z.clone())
    assert abs(at_minimum.item() - math.log(1e-5)) < 1e-3
    other = make_norm(32, "bn").train()(torch.randn(256, 32))
    assert correlation_distance(z, other) > at_minimum + 5


# --- projectors and norms ---------------------------------------------------------------------

def test_make_projector_kinds():
    linear = make_projector(8, 16, "linear")
    assert isinstance(linear, nn.Linear) and linear.bias is not None and linear.weight.shape == (16, 8)
    mlp = make_projector(8, 16, "mlp")
    assert [type(m) for m in mlp] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert mlp[0].weight.shape == (16, 8) and mlp[3].weight.shape == (16, 16)
    x = torch.randn(4, 8)
    assert make_projector(8, 8, "none")(x) is x
    with pytest.raises(ValueError, match="equal student and teacher widths"):
        make_projector(8, 16, "none")
    with pytest.raises(ValueError, match="linear, mlp, none"):
        make_projector(8, 16, "conv")


def test_make_norm_kinds():
    torch.manual_seed(0)
    x = torch.randn(64, 16) * 4 + 2
    bn = make_norm(16, "bn")
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-4
    y = bn.train()(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(0, unbiased=False), torch.ones(16), atol=1e-3, rtol=0)
    y = make_norm(16, "ln")(x)
    torch.testing.assert_close(y.mean(1), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(1, unbiased=False), torch.ones(64), atol=1e-3, rtol=0)
    assert not list(make_norm(16, "ln").parameters())
    torch.testing.assert_close(make_norm(16, "l2")(x).norm(dim=1), torch.ones(64))
    assert make_norm(16, "none")(x) is x
    with pytest.raises(ValueError, match="bn, ln, l2, none"):
        make_norm(16, "group")


# --- FeatureDistiller -------------------------------------------------------------------------

def test_distiller_defaults_are_the_paper():
    d = FeatureDistiller(8, 16)
    assert isinstance(d.projector, nn.Linear) and d.projector.bias is not None
    for norm in (d.norm_s, d.norm_t):
        assert isinstance(norm, nn.BatchNorm1d) and not norm.affine and norm.eps == 1e-4
    assert d.distance is log_sum_exp_distance and d.alpha == 4.0
    # Only the projector learns; the norms carry no parameters.
    assert {name for name, _ in d.named_parameters()} == {"projector.weight", "projector.bias"}


def test_distiller_computes_the_recipe():
    torch.manual_seed(0)
    d = FeatureDistiller(8, 16).train()
    z_s, z_t = torch.randn(32, 8), torch.randn(32, 16)
    out = d(z_s, z_t)
    assert out.dim() == 0
    p = z_s @ d.projector.weight.T + d.projector.bias
    bn = lambda z: (z - z.mean(0)) / (z.var(0, unbiased=False) + 1e-4).sqrt()
    torch.testing.assert_close(out, naive_log_sum(bn(p), bn(z_t), 4.0), rtol=1e-5, atol=1e-5)


def test_distiller_maps_equal_rows():
    torch.manual_seed(0)
    d = FeatureDistiller(6, 10).train()
    z_s, z_t = torch.randn(3, 6, 5, 4), torch.randn(3, 10, 5, 4)
    rows = lambda z: z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])   # one row per (image, position)
    on_maps, on_rows = d(z_s, z_t), d(rows(z_s), rows(z_t))
    assert on_maps.dim() == 0
    torch.testing.assert_close(on_maps, on_rows)
    # The projector acts per position: the same as a 1x1 convolution with its weight.
    conv = nn.Conv2d(6, 10, 1)
    conv.weight.data, conv.bias.data = d.projector.weight.data[:, :, None, None], d.projector.bias.data
    torch.testing.assert_close(rows(conv(z_s)), d.projector(rows(z_s)))
    with pytest.raises(ValueError, match="agree in batch and spatial size"):
        d(z_s, z_t[:, :, :4])


def test_distiller_bn_uses_batch_statistics_in_training():
    torch.manual_seed(0)
    d = FeatureDistiller(8, 8).train()
    z_s, z_t = torch.randn(32, 8), torch.randn(32, 8) * 3 + 1
    before = d(z_s, z_t)
    for norm in (d.norm_s, d.norm_t):    # garbage running statistics must not matter in training
        norm.running_mean.fill_(100.0)
        norm.running_var.fill_(1e-3)
    torch.testing.assert_close(d(z_s, z_t), before)
    assert d.norm_t.running_mean.abs().max() < 100   # ... and they are updated from the batch
    assert d.eval()(z_s, z_t) != before                # eval mode uses the running statistics


def test_teacher_features_get_no_gradient():
    torch.manual_seed(0)
    d = FeatureDistiller(8, 16)
    z_s, z_t = torch.randn(32, 8, requires_grad=True), torch.randn(32, 16, requires_grad=True)
    d(z_s, z_t).backward()
    assert z_t.grad is None
    assert z_s.grad is not None and z_s.grad.abs().sum() > 0
    assert d.projector.weight.grad.abs().sum() > 0


def test_distiller_under_autocast_is_float32_and_close():
    torch.manual_seed(0)
    d = FeatureDistiller(32, 64).train()
    z_s, z_t = torch.randn(64, 32), torch.randn(64, 64)
    full = d(z_s, z_t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = d(z_s, z_t.bfloat16())
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, full, rtol=2e-2, atol=2e-2)


BATCH_NORM = lambda z: (z - z.mean(0)) / (z.var(0, unbiased=False) + 1e-4).sqrt()
LAYER_NORM = lambda z: (z - z.mean(1, keepdim=True)) / (z.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
UNIT_NORM = lambda z: z / z.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("projector,norm,distance,norm_fn,distance_fn", [
    ("linear", "bn", "logsum", BATCH_NORM, log_sum_exp_distance),
    ("mlp", "bn", "logsum", BATCH_NORM, log_sum_exp_distance),
    ("none", "bn", "logsum", BATCH_NORM, log_sum_exp_distance),
    ("linear", "ln", "logsum", LAYER_NORM, log_sum_exp_distance),
    ("linear", "l2", "logsum", UNIT_NORM, log_sum_exp_distance),
    ("linear", "none", "logsum", lambda z: z, log_sum_exp_distance),
    ("linear", "bn", "corr", BATCH_NORM, correlation_distance),
])
def test_distiller_variants_compute_their_formula(projector, norm, distance, norm_fn, distance_fn):
    torch.manual_seed(0)
    z_s, z_t = torch.randn(32, 16), torch.randn(32, 16) * 2 + 1
    d = FeatureDistiller(16, 16, projector=projector, norm=norm, distance=distance).train()
    with torch.no_grad():
        projected = d.projector(z_s)
    if projector == "none":
        assert projected is z_s
    expected = distance_fn(norm_fn(projected), norm_fn(z_t))
    torch.testing.assert_close(d(z_s, z_t), expected, rtol=1e-6, atol=1e-6)


def test_distiller_rejects_bad_choices():
    with pytest.raises(ValueError, match="equal student and teacher widths"):
        FeatureDistiller(8, 16, projector="none")
    with pytest.raises(ValueError, match="logsum, corr"):
        FeatureDistiller(8, 16, distance="l2")


def test_distiller_alpha_is_used():
    torch.manual_seed(0)
    z_s, z_t = torch.randn(32, 16), torch.randn(32, 16)
    torch.manual_seed(1)
    d2 = FeatureDistiller(16, 16, alpha=2.0)
    torch.manual_seed(1)
    d4 = FeatureDistiller(16, 16, alpha=4.0)
    assert d2(z_s, z_t) != d4(z_s, z_t)


# --- projector_spectrum -----------------------------------------------------------------------

def test_projector_spectrum_is_the_singular_values():
    torch.manual_seed(0)
    d = FeatureDistiller(8, 12)
    q_left, _ = torch.linalg.qr(torch.randn(12, 8))
    q_right, _ = torch.linalg.qr(torch.randn(8, 8))
    singular = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.0])
    d.projector.weight.data = q_left @ torch.diag(singular) @ q_right.T
    torch.testing.assert_close(projector_spectrum(d), singular, atol=1e-5, rtol=1e-5)
    assert projector_spectrum(FeatureDistiller(8, 12, projector="mlp")) is None


# --- the global batch under torchrun ----------------------------------------------------------

def _distiller_on_ranks(rank, world, folder, distance):
    """One rank of a 2-process gloo group: a linear 'student' and the distiller in one DDP module,
    each rank on its own half of the batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    x, z_t, model = _global_batch_problem(distance)
    rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    x = x[rows].clone().requires_grad_()
    ddp = DDP(model)
    loss = ddp(x, z_t[rows])
    loss.backward()
    running_var = model.distiller.norm_t.running_var.clone()  # updated from the global batch's statistics
    model.distiller.global_batch = False  # per-rank statistics: the loss of this rank's rows alone
    local_loss = model(x, z_t[rows])
    if rank == 0:
        torch.save({"loss": loss.item(), "local_loss": local_loss.item(), "x_grad": x.grad,
                    "grads": {k: p.grad for k, p in model.named_parameters()},
                    "running_var": running_var}, folder / "rank0.pt")
    dist.destroy_process_group()


class _StudentAndDistiller(nn.Module):
    def __init__(self, distance):
        super().__init__()
        self.student, self.distiller = nn.Linear(12, 16), FeatureDistiller(16, 24, distance=distance)

    def forward(self, x, z_t):
        return self.distiller(self.student(x), z_t)


def _global_batch_problem(distance):
    torch.manual_seed(0)
    x, z_t = torch.randn(16, 12), 3 * torch.randn(16, 24) + 1
    return x, z_t, _StudentAndDistiller(distance)


@pytest.mark.parametrize("distance", ["logsum", "corr"])
def test_distiller_takes_the_global_batch_under_ddp(tmp_path, distance):
    import torch.multiprocessing as mp
    x, z_t, model = _global_batch_problem(distance)
    x = x.clone().requires_grad_()
    loss = model(x, z_t)
    loss.backward()
    mp.start_processes(_distiller_on_ranks, args=(2, tmp_path, distance), nprocs=2, start_method="spawn")
    got = torch.load(tmp_path / "rank0.pt")
    assert abs(got["loss"] - loss.item()) <= 1e-6 * max(1.0, abs(loss.item()))
    for name, p in model.named_parameters():  # what DDP averages: the student's and the projector's gradients
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
    # Rank 0's own rows get world x the single-process gradient, as from any per-rank mean (see _GatherRows).
    torch.testing.assert_close(got["x_grad"] / 2, x.grad[:8], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["running_var"], model.distiller.norm_t.running_var)
    _, _, fresh = _global_batch_problem(distance)
    local = fresh(x[:8].detach(), z_t[:8]).item()
    assert abs(got["local_loss"] - local) <= 1e-5 * max(1.0, abs(local)) and abs(local - loss.item()) > 1e-3
