"""The mathematics of common.py: each test fails when the thing it names is broken."""
import math

import pytest
import torch
import torch.nn as nn

from common import (DISTANCES, NORMS, PROJECTORS, FeatureDistiller, correlation_distance, correlation_sum, linear_cka,
                    log_sum_exp_distance, make_norm, make_projector, mean_power_distance, projector_cka,
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


# --- the distances without the log (Tables 6.3 and 6.9) ---------------------------------------

NAIVE = {  # each distance as its formula reads, for the float64 ground truth
    "logsum": lambda a, b, alpha: torch.log((a - b).abs().pow(alpha).sum()),
    "corr": lambda a, b, alpha: torch.log(((a * b).sum(0) / a.shape[0] - 1).abs().pow(alpha).sum() + 1e-5),
    "mean": lambda a, b, alpha: (a - b).abs().pow(alpha).mean(),
    "corr-nolog": lambda a, b, alpha: ((a * b).sum(0) / a.shape[0] - 1).abs().pow(alpha).sum(),
}
FNS = {"logsum": log_sum_exp_distance, "corr": correlation_distance, "mean": mean_power_distance,
       "corr-nolog": correlation_sum}


def test_every_distance_has_a_formula_here():
    assert set(NAIVE) == set(FNS) == set(DISTANCES)


@pytest.mark.parametrize("alpha", [2.0, 4.0])
@pytest.mark.parametrize("name", ["mean", "corr-nolog"])
def test_distance_without_log_equals_formula_and_its_gradient(name, alpha):
    torch.manual_seed(0)
    a, b = torch.randn(16, 32), torch.randn(16, 32) * 2 + 0.5
    value, grad_a, grad_b = value_and_grads(FNS[name], a, b, alpha=alpha)
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    ref = NAIVE[name](a64, b64, alpha)
    ref.backward()
    assert value.dtype == torch.float32 and value.dim() == 0
    torch.testing.assert_close(value.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_a.double(), a64.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grad_b.double(), b64.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["mean", "corr-nolog"])
def test_distance_without_log_under_bf16_autocast_is_float32(name):
    torch.manual_seed(0)
    a, b = torch.randn(16, 32) * 30, torch.randn(16, 32) * 30
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = FNS[name](a, b, alpha=2.0)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), NAIVE[name](a.double(), b.double(), 2.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", DISTANCES)
@pytest.mark.parametrize("alpha", [1.0, 2.0, 4.0])
def test_every_distance_is_finite_where_differences_are_zero(name, alpha):
    torch.manual_seed(0)
    a = torch.randn(8, 16)
    some = a.clone()
    some[:4] = torch.randn(4, 16)   # half the rows differ, half agree exactly
    for b in (a.clone(), some):     # all differences 0, then some
        value, grad_a, grad_b = value_and_grads(FNS[name], a, b, alpha=alpha)
        assert_finite(value, grad_a, grad_b)


# --- projectors and norms ---------------------------------------------------------------------

def test_make_projector_hidden_width():
    mlp = make_projector(8, 16, "mlp", hidden=1024)
    assert [type(m) for m in mlp] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert mlp[0].weight.shape == (1024, 8) and mlp[1].num_features == 1024 and mlp[3].weight.shape == (16, 1024)
    assert FeatureDistiller(8, 16, projector="mlp", hidden=1024).projector[0].out_features == 1024
    assert make_projector(8, 16, "linear", hidden=1024).weight.shape == (16, 8)  # only the MLP has a hidden layer


@pytest.mark.parametrize("dim,groups", [(64, 16), (512, 16), (100, 4), (24, 8)])
def test_group_norm_is_the_formula(dim, groups):
    torch.manual_seed(0)
    gn = make_norm(dim, "gn")
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == groups and not gn.affine and gn.eps == 1e-4
    assert not list(gn.parameters())
    x = torch.randn(32, dim) * 3 + 1
    g = x.double().view(32, groups, dim // groups)
    expected = ((g - g.mean(2, keepdim=True)) / (g.var(2, unbiased=False, keepdim=True) + 1e-4).sqrt()).view(32, dim)
    torch.testing.assert_close(gn(x).double(), expected, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):   # inside the distiller, under autocast
        d = FeatureDistiller(dim, dim, norm="gn").train()
        out = d(x, x * 2)
    assert out.dtype == torch.float32 and torch.isfinite(out)


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
    with pytest.raises(ValueError, match="linear, mlp, mlp-plain, none"):
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
    with pytest.raises(ValueError, match="bn, gn, ln, l2, none"):
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
    ("linear", "bn", "mean", BATCH_NORM, mean_power_distance),
    ("linear", "bn", "corr-nolog", BATCH_NORM, correlation_sum),
    ("linear", "gn", "logsum", lambda z: make_norm(16, "gn")(z), log_sum_exp_distance),
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


@pytest.mark.parametrize("student_dim,teacher_dim", [(8, 12), (20, 6)])
def test_projector_spectrum_is_whole_and_sorted(student_dim, teacher_dim):
    sv = projector_spectrum(FeatureDistiller(student_dim, teacher_dim))
    assert sv.shape == (min(student_dim, teacher_dim),) and (sv > 0).all()
    assert (sv[:-1] >= sv[1:]).all()   # largest first, as Figure 6.2 plots them


# --- the global batch under torchrun ----------------------------------------------------------

# (projector, norm, distance): every projector, norm and distance at least once, the paper's recipe first.
GLOBAL_BATCH_CASES = [("linear", "bn", d) for d in DISTANCES] + [(p, "bn", "logsum") for p in PROJECTORS[1:]] + \
                     [("linear", n, "logsum") for n in NORMS[1:]]


def _distiller_on_ranks(rank, world, folder):
    """One rank of a 2-process gloo group: for each case, a linear 'student' and the distiller in one DDP
    module, each rank on its own half of the batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    results = {}
    for case in GLOBAL_BATCH_CASES:
        x, z_t, model = _global_batch_problem(*case)
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        x = x[rows].clone().requires_grad_()
        ddp = DDP(model)
        loss = ddp(x, z_t[rows])
        loss.backward()
        buffers = {k: b.clone() for k, b in model.named_buffers()}  # updated from the global batch's statistics
        model.distiller.global_batch = False  # per-rank statistics: the loss of this rank's rows alone
        local_loss = model(x, z_t[rows])
        results[case] = {"loss": loss.item(), "local_loss": local_loss.item(), "x_grad": x.grad,
                         "grads": {k: p.grad for k, p in model.named_parameters()}, "buffers": buffers}
    if rank == 0:
        torch.save(results, folder / "rank0.pt")
    dist.destroy_process_group()


class _StudentAndDistiller(nn.Module):
    def __init__(self, teacher_dim, projector, norm, distance):
        super().__init__()
        self.student = nn.Linear(12, 16)
        self.distiller = FeatureDistiller(16, teacher_dim, projector, norm, distance, hidden=32)

    def forward(self, x, z_t):
        return self.distiller(self.student(x), z_t)


def _global_batch_problem(projector="linear", norm="bn", distance="logsum"):
    torch.manual_seed(0)
    teacher_dim = 16 if projector == "none" else 24
    x, z_t = torch.randn(16, 12), 3 * torch.randn(16, teacher_dim) + 1
    return x, z_t, _StudentAndDistiller(teacher_dim, projector, norm, distance)


def test_distiller_takes_the_global_batch_under_ddp(tmp_path):
    """Two processes at half the batch each optimise exactly the single-process objective: loss, the gradients
    DDP averages, every batch statistic (the MLP projector's hidden BN included), for every projector, norm and
    distance."""
    import torch.multiprocessing as mp
    mp.start_processes(_distiller_on_ranks, args=(2, tmp_path), nprocs=2, start_method="spawn")
    results = torch.load(tmp_path / "rank0.pt")
    for case in GLOBAL_BATCH_CASES:
        got = results[case]
        x, z_t, model = _global_batch_problem(*case)
        x = x.clone().requires_grad_()
        loss = model(x, z_t)
        loss.backward()
        assert abs(got["loss"] - loss.item()) <= 1e-6 * max(1.0, abs(loss.item())), case
        for name, p in model.named_parameters():  # what DDP averages: the student's and the projector's gradients
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-5, atol=1e-6, msg=f"{case} {name}")
        # Rank 0's own rows get world x the single-process gradient, as from any per-rank mean (see _GatherRows).
        torch.testing.assert_close(got["x_grad"] / 2, x.grad[:8], rtol=1e-5, atol=1e-7, msg=str(case))
        for name, buffer in model.named_buffers():
            torch.testing.assert_close(got["buffers"][name], buffer, msg=f"{case} {name}")
        _, _, fresh = _global_batch_problem(*case)
        local = fresh(x[:8].detach(), z_t[:8]).item()
        assert abs(got["local_loss"] - local) <= 1e-5 * max(1.0, abs(local)), case
        assert abs(local - loss.item()) > 1e-3, case  # the two objectives differ: the test can tell them apart


def _gathered_dtypes_on_ranks(rank, world, folder):
    """One rank of a 2-process gloo group: the distiller on bf16 features under bf16 autocast, the dtypes of what
    its gather sends and sums recorded."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    sent, all_gather, all_reduce = [], dist.all_gather, dist.all_reduce
    dist.all_gather = lambda out, rows, *a, **kw: (sent.append(("all_gather", rows.dtype)), all_gather(out, rows))[1]
    dist.all_reduce = lambda grad, *a, **kw: (sent.append(("all_reduce", grad.dtype)), all_reduce(grad))[1]
    torch.manual_seed(rank)
    z_s = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = FeatureDistiller(16, 24, "mlp", hidden=32)(z_s, torch.randn(4, 24, dtype=torch.bfloat16))
    loss.backward()
    if rank == 0:
        torch.save({"sent": sent, "grad": z_s.grad.dtype, "loss": loss.dtype}, folder / "rank0.pt")
    dist.destroy_process_group()


def test_distiller_gathers_the_rows_in_float32(tmp_path):
    """Under DDP the rows are gathered, and their gradients summed over the ranks, in float32 whatever the
    features' dtype (an fp16 sum of loss-scaled gradients over many ranks overflows sooner); the student's
    gradient comes back in its own dtype."""
    import torch.multiprocessing as mp
    mp.start_processes(_gathered_dtypes_on_ranks, args=(2, tmp_path), nprocs=2, start_method="spawn")
    got = torch.load(tmp_path / "rank0.pt")
    # z_s and z_t gathered; z_s's gradient summed (z_t, the teacher's, has none)
    assert got["sent"] == [("all_gather", torch.float32)] * 2 + [("all_reduce", torch.float32)], got["sent"]
    assert got["grad"] == torch.bfloat16 and got["loss"] == torch.float32


def test_plain_mlp_projector_is_linear_relu_linear():
    """'mlp-plain' is the official code's MLP: Linear-ReLU-Linear, no BN; its value is the formula in float64."""
    torch.manual_seed(0)
    mlp = make_projector(8, 16, "mlp-plain", hidden=32)
    assert [type(m) for m in mlp] == [nn.Linear, nn.ReLU, nn.Linear] and mlp[0].out_features == 32
    assert not list(mlp.buffers())
    x = torch.randn(10, 8)
    w1, b1, w2, b2 = (t.detach().double() for t in (mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias))
    expected = (x.double() @ w1.T + b1).clamp_min(0) @ w2.T + b2
    torch.testing.assert_close(mlp(x).double(), expected, rtol=1e-5, atol=1e-6)
    assert make_projector(8, 16, "mlp-plain")[0].out_features == 16  # hidden defaults to the output width


def naive_linear_cka(x, y):
    """Linear CKA by its kernel definition in float64: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = x x^T, L = y y^T,
    HSIC(K, L) = tr(K H L H) with the centring matrix H = I - 11^T / n."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)
    return hsic(k, l) / (hsic(k, k) * hsic(l, l)).sqrt()


def test_linear_cka_is_the_kernel_formula():
    torch.manual_seed(0)
    x = torch.randn(50, 8) * 3 + 2
    y = torch.tanh(x @ torch.randn(8, 12)) + 0.1 * torch.randn(50, 12)
    cka = linear_cka(x, y)
    assert cka.dtype == torch.float32 and cka.dim() == 0 and 0 < cka < 1
    torch.testing.assert_close(cka.double(), naive_linear_cka(x, y), rtol=1e-5, atol=1e-6)
    q = torch.linalg.qr(torch.randn(8, 8))[0]  # invariant to an orthogonal map, a scale and a shift
    torch.testing.assert_close(linear_cka(x, 5 * x @ q + 3), torch.tensor(1.0), rtol=1e-5, atol=1e-5)
    assert linear_cka(torch.randn(4000, 4), torch.randn(4000, 4)) < 0.01  # independent: near 0
    few_wide = torch.randn(8, 192) * 3 + 1  # DeiT-Ti's 192 -> 3024 on a batch of 8: float32 sums err by 4e-4
    wide = few_wide @ torch.randn(192, 3024) / 192 ** 0.5 + 0.5
    torch.testing.assert_close(linear_cka(few_wide, wide).double(), naive_linear_cka(few_wide, wide), rtol=1e-6, atol=0)


@pytest.mark.parametrize("projector", ["linear", "mlp", "mlp-plain", "none"])
def test_projector_cka_is_the_formula_and_leaves_the_distiller_as_it_was(projector):
    """Figure 6.3's measure: CKA(z_s, projector(z_s)) with the projector as in training (the MLP's BN on batch
    statistics), computed on copies of its buffers; maps are taken as the distiller's rows (per position)."""
    torch.manual_seed(0)
    width = 8 if projector == "none" else 16
    distiller = FeatureDistiller(8, width, projector=projector, hidden=32).train()
    before = {k: v.clone() for k, v in distiller.state_dict().items()}
    z_s = torch.randn(6, 8, 3, 3) * 2 + 1
    rows = z_s.permute(0, 2, 3, 1).reshape(-1, 8)
    cka = projector_cka(distiller, z_s)
    assert cka.dtype == torch.float32 and cka.dim() == 0 and not cka.requires_grad
    p = distiller.projector
    if projector == "linear":
        out = rows.double() @ p.weight.detach().double().T + p.bias.detach().double()
    elif projector == "mlp":
        h = rows.double() @ p[0].weight.detach().double().T + p[0].bias.detach().double()
        h = ((h - h.mean(0)) / (h.var(0, unbiased=False) + p[1].eps).sqrt()).clamp_min(0)
        out = h @ p[3].weight.detach().double().T + p[3].bias.detach().double()
    elif projector == "mlp-plain":
        h = (rows.double() @ p[0].weight.detach().double().T + p[0].bias.detach().double()).clamp_min(0)
        out = h @ p[2].weight.detach().double().T + p[2].bias.detach().double()
    else:
        out = rows.double()
    torch.testing.assert_close(cka.double(), naive_linear_cka(rows, out), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in distiller.state_dict().items())  # BN running stats too
    wrapped = nn.Module()
    wrapped.module = distiller  # as DDP wraps it
    assert torch.equal(projector_cka(wrapped, z_s), cka)
