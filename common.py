"""The recipe of "Understanding the Role of the Projector in Knowledge Distillation"
(Miles & Mikolajczyk, AAAI 2024), and nothing else.

Feature distillation needs three ingredients:

1. a **linear projector** ``W_p`` on the student feature ``z_s``. Trained with the student,
   it implicitly encodes relational information from past batches (the paper's analysis of
   the projector's weights and singular values), so no explicit relational loss is needed;
2. **batch normalisation** of both ``z_s W_p`` and the teacher feature ``z_t``, without affine
   parameters. It whitens both spaces and couples with the projector's training dynamics,
   keeping the projector from collapsing;
3. a **soft maximum** distance ``log sum_i |z_s W_p - z_t|_i ** alpha``, which focuses on the
   largest differences and copes with large teacher-student capacity gaps.

Everything here takes pooled features ``(B, C)`` and feature maps ``(B, C, H, W)``; a script
adds cross-entropy and the KD term around it. Usage::

    distiller = FeatureDistiller(student_dim=256, teacher_dim=256)   # paper defaults
    loss = ce + kd + 2.0 * distiller(z_s, z_t)                        # z_t from the frozen teacher
    # train distiller.parameters() with the student's optimizer
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

PROJECTORS = ("linear", "mlp", "mlp-plain", "none")
NORMS = ("bn", "gn", "ln", "l2", "none")
# The paper's soft maximum, the official DeiT code's correlation form, and both without the log (the ablations of
# Tables 6.3 and 6.9: "mean" with alpha = 2 is the mean square, "corr-nolog" with alpha = 2 / 4 the correlation and
# higher-order rows).
DISTANCES = ("logsum", "corr", "mean", "corr-nolog")


def log_sum_exp_distance(a, b, alpha=4.0):
    """The paper's soft maximum ``log sum_i |a_i - b_i| ** alpha`` over every element.

    A larger ``alpha`` moves the distance from a sum towards the maximum difference. Written as a
    log-sum-exp of ``alpha * log|d|`` with the largest ``|d|`` (``m``) factored out::

        log sum |d|**alpha = alpha * log m + log sum (|d| / m)**alpha

    so it neither overflows (``|d| = 1e10``, ``alpha = 4``) nor underflows in float32, and is
    computed in float32 whatever the input dtype or autocast state. The naive form of the
    official code also gives NaN gradients where a difference is exactly 0; here every
    difference may be 0 (the sum is then clamped at ``m``'s floor: a finite value, zero gradient).
    Needs ``alpha >= 1`` for finite gradients at ``d = 0``.
    """
    with torch.autocast(a.device.type, enabled=False):
        d = (a.float() - b.float()).abs()
        # m carries no gradient: the value does not depend on it, so neither does the gradient.
        m = d.detach().amax().clamp_min(torch.finfo(torch.float32).tiny)
        # The largest element contributes (m / m)**alpha = 1, so the sum is >= 1 unless every
        # difference is 0; clamping at 1 only guards that case against log(0).
        return alpha * m.log() + (d / m).pow(alpha).sum().clamp_min(1.0).log()


def mean_power_distance(a, b, alpha=4.0):
    """``mean_i |a_i - b_i| ** alpha`` over every element: the distance without the soft maximum (with
    ``alpha = 2`` the mean square, the paper's Table 6.9 rows and the "without LogSum" of Table 6.3).
    Our reading: the mean over batch and dimensions where the paper writes a squared norm (a constant factor).

    In float32 whatever the input dtype or autocast state; finite gradients where differences are 0 for
    ``alpha >= 1``.
    """
    with torch.autocast(a.device.type, enabled=False):
        return (a.float() - b.float()).abs().pow(alpha).mean()


def correlation_sum(a, b, alpha=4.0):
    """``sum_d |c_d - 1| ** alpha`` with ``c_d = mean_b a_bd * b_bd``, the diagonal of the student-teacher
    cross-correlation of batch-normalised features: 1 where a feature dimension agrees perfectly across the
    batch. The paper's "correlation" (``alpha = 2``) and "higher order" (``alpha = 4``) rows of Table 6.9.
    Computed in float32.
    """
    with torch.autocast(a.device.type, enabled=False):
        c = (a.float() * b.float()).mean(0)
        return (c - 1).abs().pow(alpha).sum()


def correlation_distance(a, b, alpha=4.0):
    """The variant in the official DeiT code: ``log(correlation_sum + 1e-5)``, its soft maximum."""
    return (correlation_sum(a, b, alpha) + 1e-5).log()


DISTANCE_FNS = dict(zip(DISTANCES, (log_sum_exp_distance, correlation_distance, mean_power_distance,
                                    correlation_sum)))


def make_projector(in_dim, out_dim, kind="linear", hidden=None):
    """Map the student feature into the teacher's space: ``z_s W_p``.

    ``'linear'`` (with bias: the paper's choice for its large-scale runs); ``'mlp'`` (Linear-BN-ReLU-Linear of
    hidden width ``hidden``, default ``out_dim``: the paper's CIFAR-100 runs use 1024, its Figure 6.3 compares
    widths); ``'mlp-plain'`` (Linear-ReLU-Linear, the official code's one MLP); ``'none'`` (identity; needs equal
    widths). The paper says only "MLP": ``'mlp'`` is our reading and the default MLP, because its BN whitens the
    hidden layer as the norms whiten the output, which keeps it from collapsing.
    """
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        hidden = hidden or out_dim
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, out_dim))
    if kind == "mlp-plain":
        hidden = hidden or out_dim
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))
    if kind == "none":
        if in_dim != out_dim:
            raise ValueError(f"projector 'none' needs equal student and teacher widths, got {in_dim} and "
                             f"{out_dim}; use projector 'linear'")
        return nn.Identity()
    raise ValueError(f"unknown projector {kind!r}; choose from {', '.join(PROJECTORS)}")


class L2Norm(nn.Module):
    """Unit L2 norm per sample (per position on feature maps)."""

    def forward(self, x):
        return F.normalize(x, dim=1)


def make_norm(dim, kind="bn"):
    """Normalise features before the distance (the paper's second ingredient).

    ``'bn'``: ``BatchNorm1d(eps=1e-4, affine=False)`` as in the official code, batch statistics in
    training mode; ``'gn'``: GroupNorm without affine, 16 groups (the unused GroupNorm of the official code's first
    release; ``gcd(16, dim)`` groups when 16 does not divide ``dim``), the paper's Table 6.1, with eps 1e-4 as the
    BN's: a departure, the official GroupNorm has eps 0; ``'ln'``: LayerNorm without affine; ``'l2'``: unit L2
    norm; ``'none'``.
    """
    if kind == "bn":
        return nn.BatchNorm1d(dim, eps=1e-4, affine=False)
    if kind == "gn":
        return nn.GroupNorm(math.gcd(16, dim), dim, eps=1e-4, affine=False)
    if kind == "ln":
        return nn.LayerNorm(dim, elementwise_affine=False)
    if kind == "l2":
        return L2Norm()
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose from {', '.join(NORMS)}")


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's rows (rank order) with a gradient path back to each rank's own rows.

    Every rank computes the same global loss, so the gradient of its own rows is the sum over the
    ranks of the incoming gradients: ``world`` times the single-process one, the same factor that a
    per-rank mean gives every other loss term, which DDP's averaging then removes.
    """

    @staticmethod
    def forward(ctx, rows):
        ctx.rank, ctx.n = dist.get_rank(), rows.shape[0]
        gathered = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, rows.contiguous())
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # summed over ranks; gloo has no reduce-scatter, and the rows are few
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


class FeatureDistiller(nn.Module):
    """``distance(norm_s(projector(z_s)), norm_t(z_t))``: the paper's feature loss, unweighted.

    Takes pooled features ``(B, C)`` or feature maps ``(B, C, H, W)``. Maps are laid out as rows
    of ``(B*H*W, C)``, so the projector acts per position (a 1x1 convolution) and BN per channel
    over ``B*H*W`` with one code path. The teacher feature is detached: only the student and the
    projector learn. Put ``distiller.parameters()`` in the student's optimizer, and the distiller in
    the same DDP module as the student so the projector stays identical on every rank.

    ``global_batch`` (default True): under an initialised process group of more than one rank, the
    student rows (before the projector) and the teacher rows of every rank are gathered (with autograd)
    in training, so that every batch statistic (the norms', and the hidden BN's of the ``'mlp'``
    projector) and the distance are those of the global batch: the loss equals the single-process loss
    at the same global batch, and the gradients that DDP averages equal the single-process gradients,
    for every projector, norm and distance. Every rank must then pass the same number of rows (a
    DistributedSampler's shards do). ``False`` keeps per-rank statistics (detection maps are too large
    to gather).
    """

    def __init__(self, student_dim, teacher_dim, projector="linear", norm="bn", distance="logsum", alpha=4.0,
                 global_batch=True, hidden=None):
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; choose from {', '.join(DISTANCES)}")
        self.projector = make_projector(student_dim, teacher_dim, projector, hidden)
        self.norm_s = make_norm(teacher_dim, norm)
        self.norm_t = make_norm(teacher_dim, norm)
        self.distance = DISTANCE_FNS[distance]
        self.alpha = alpha
        self.global_batch = global_batch

    @staticmethod
    def _rows(z):
        return z.permute(0, 2, 3, 1).flatten(0, 2) if z.dim() == 4 else z

    def forward(self, z_s, z_t):
        if z_s.dim() != z_t.dim() or z_s.shape[0] != z_t.shape[0] or z_s.shape[2:] != z_t.shape[2:]:
            raise ValueError(f"student features {tuple(z_s.shape)} and teacher features {tuple(z_t.shape)} "
                             "must agree in batch and spatial size")
        z_s, z_t = self._rows(z_s), self._rows(z_t.detach())
        if self.global_batch and self.training and dist.is_initialized() and dist.get_world_size() > 1:
            # Rows in rank order on every rank, gathered in float32: the backward sums the ranks' row gradients,
            # which under fp16 carry the loss scale, and an fp16 sum over many ranks overflows sooner.
            z_s, z_t = _GatherRows.apply(z_s.float()), _GatherRows.apply(z_t.float())
        # Normalise in float32: BN statistics of wide teacher features lose precision in bf16.
        return self.distance(self.norm_s(self.projector(z_s).float()), self.norm_t(z_t.float()), self.alpha)


def projector_spectrum(distiller):
    """Every singular value of the linear projector's weight ``W_p``, largest first: ``min(student, teacher
    width)`` of them, the data of the paper's Figure 6.2 (without batch norm many collapse towards 0).

    Returns None for a projector that is not one linear map (the MLP's ReLU makes a product of its weights
    meaningless as ``W_p``).
    """
    projector = getattr(distiller, "module", distiller).projector
    if not isinstance(projector, nn.Linear):
        return None
    return torch.linalg.svdvals(projector.weight.detach().float())


def linear_cka(x, y):
    """Linear CKA of two sets of rows ``(n, d_x)`` and ``(n, d_y)``, both centred:
    ``|x^T y|_F^2 / (|x^T x|_F |y^T y|_F)``, in [0, 1], 1 when ``y`` is an orthogonal map of ``x`` times a scale.
    Computed in float64 (in float32 a few rows of wide features err by 1e-3, above 1), returned as float32."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cka = (x.T @ y).square().sum() / ((x.T @ x).norm() * (y.T @ y).norm()).clamp_min(torch.finfo(torch.float64).tiny)
    return cka.float()


@torch.no_grad()
def projector_cka(distiller, z_s):
    """Figure 6.3's measure, as we read it: the linear CKA between the projector's centred input ``z_s`` and its
    output ``z_s W_p`` on this batch (rows as the distiller lays them out), a 0-d float32 tensor. The projector runs
    as in training (an MLP's BN on batch statistics) on copies of its buffers, so its running statistics and the run's
    weights are left as they were."""
    projector = getattr(distiller, "module", distiller).projector
    rows = FeatureDistiller._rows(z_s.detach())
    state = {**dict(projector.named_parameters()), **{k: v.clone() for k, v in projector.named_buffers()}}
    with torch.autocast(rows.device.type, enabled=False):
        return linear_cka(rows.float(), torch.func.functional_call(projector, state, (rows.float(),)))
