"""Projector-based feature distillation on COCO 2017 detection (the paper's Table 6.8), on torchvision.

"Understanding the Role of the Projector in Knowledge Distillation" (Miles & Mikolajczyk, AAAI 2024) distils, in
ReviewKD's setting, a Faster R-CNN ResNet-50-FPN teacher into a MobileNetV2-FPN student through the backbones'
output features. COCO val box AP / AP50 (the first author's PhD thesis, Imperial College London, Table 6.8):
teacher (detectron2's weights) 40.22 / 61.02; student alone 29.47 / 48.87; KD 30.13 / 50.28; FitNet 30.20 / 49.80;
FPGI 31.16 / 50.68; ReviewKD 33.71 / 53.15; SRD, this method, 32.92 / 52.96.

At every FPN level (strides 4-64, paired by measured stride), log sum |BN(z_s W_p) - BN(z_t)| ** alpha (alpha = 4;
W_p linear at every position; BN per channel, no affine), summed over levels and times --feat-weight, joins the
four detection losses of torchvision's Faster R-CNN; both backbones see the student's transformed batch.

Defaults: the student is torchvision's ImageNet MobileNetV2 (IMAGENET1K_V1) under an FPN over the ends of its
stride-4/8/16/32 stages and a max-pool level (ReviewKD's detectron2 student); the teacher is torchvision's COCO
fasterrcnn_resnet50_fpn, the paper's architecture. Detectron2's 1x schedule, which ReviewKD's 180k iterations of 8
images at lr 0.01 equal: 12 epochs, x0.1 at 8 and 11, SGD momentum 0.9, lr 0.02 per 16 images, wd 1e-4, 1000 warm-up
iterations, shorter side 640-800 in training and 800 at test (longer at most 1333), flips, aspect-ratio bins. Every
COCOeval (bbox) runs in float32. Where this departs from the paper's runs, one line each:
- torchvision's Faster R-CNN heads are not detectron2's (RoIAlign v1 with sampling ratio 2, smooth-L1 beta 1/9,
  2,000 RPN proposals kept in training, 91 classes): 29.47 / 32.92 are not directly comparable; the honest figure
  is SRD against this script's own --distill none run;
- the paper's teacher (40.22) is detectron2's 3x model on an MSRA ResNet-50, not torchvision's 37.0 weights;
- ReviewKD weights its feature loss 2.0, the paper does not state its weight: 1 here (--feat-weight), since 2.0
  weights ReviewKD's own loss, whose scale the log-sum does not share;
- distilling all five FPN maps is our reading of the paper's "backbone output features";
- the student's ImageNet weights and RGB normalisation are torchvision's, not ReviewKD's checkpoint.

    torchrun --nproc_per_node=8 coco_kd.py --data-dir data/coco                  # SRD: 32.92 AP in the paper
    python coco_kd.py --data-dir data/coco --batch-size 16                       # the same on one GPU
    torchrun --nproc_per_node=8 coco_kd.py --data-dir data/coco --distill none   # the student alone: 29.47
    python coco_kd.py --dummy --epochs 1 --max-steps 20 --min-size 320 --max-size 512   # no files, no downloads

Data: <data-dir>/annotations/instances_{train,val}2017.json, <data-dir>/{train,val}2017/*.jpg (cocodataset.org).
A run prints the teacher's val AP, then the losses every --log-every steps and the COCO AP of each epoch; it writes
args.json, metrics.jsonl, last.pt, best.pt, summary.json (headline: the last epoch's AP, as detection papers report).
"""
import argparse
from contextlib import contextmanager, nullcontext, redirect_stdout
import datetime
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.datasets import CocoDetection
from torchvision.io import ImageReadMode, decode_image
from torchvision.models import detection, mobilenet_v2
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from common import DISTANCES, NORMS, PROJECTORS, FeatureDistiller, projector_cka, projector_spectrum

try:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
except ImportError:
    COCO = None

PROG = Path(__file__).stem
TEACHER_TOLERANCE = 1.0  # points (top-1; COCO: AP) a teacher may be off its published score before the run says so
FIXED_INPUT_SIZE = False  # detection batches come in many sizes: cuDNN would re-tune its kernels for each
STUDENTS = ("mobilenet_v2", "resnet18", "resnet34", "resnet50", "mobilenet_v3_large")
COCO_TEACHERS = {"fasterrcnn_resnet50_fpn": 37.0, "fasterrcnn_resnet50_fpn_v2": 46.7}  # torchvision's box AP
NUM_CLASSES = 91  # torchvision's COCO heads: background + category ids 1..90 used directly as labels
DET_LOSSES = {"loss_classifier": "cls", "loss_box_reg": "box", "loss_objectness": "obj", "loss_rpn_box_reg": "rpn"}
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# What makes a resumed run the same run: the data, the models, the distiller, the optimiser and its schedule (all
# but --epochs). The loss weights may change (a resume may re-weigh the objective), as may speed, logging and output
# flags. The world size is checked too.
RESUME_MUST_MATCH = ("dummy", "data_dir", "min_size", "max_size", "student", "no_pretrained_backbone", "teacher",
                     "distill", "projector", "projector_hidden", "norm", "distance", "alpha", "batch_size", "lr",
                     "lr_milestones", "warmup_iters", "momentum", "wd", "max_steps")
LAYOUT = ("expected <data-dir>/annotations/instances_{train,val}2017.json and <data-dir>/{train,val}2017/ "
          "with the images (from cocodataset.org), or pass --dummy")


def fail(msg, code=2):
    """One line on stderr, then exit: 2 for bad input (before anything is written), 3 for a run that cannot go
    on, 130 when interrupted. Under torchrun rank 0 speaks for all; every rank exits."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{PROG}: error: {msg}", file=sys.stderr)
    sys.exit(code)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)", except for defaults resolved after parsing (None), whose help says them."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.error = lambda message: fail(f"{message}; see --help")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="data/coco", help="COCO 2017 root: annotations/, train2017/, val2017/")
    g.add_argument("--dummy", action="store_true", help="random images, boxes and teacher: no files, no downloads")
    g.add_argument("--min-size", type=int, nargs="+", default=[640, 672, 704, 736, 768, 800],
                   help="shorter image side: one of these per training image, the last at test (detectron2's)")
    g.add_argument("--max-size", type=int, default=1333, help="... unless the longer side would exceed this")
    g = p.add_argument_group("models")
    g.add_argument("--student", default="mobilenet_v2", choices=STUDENTS, metavar="ARCH",
                   help="student backbone: mobilenet_v2 (the paper's), resnet18/34/50, mobilenet_v3_large")
    g.add_argument("--no-pretrained-backbone", action="store_true", help="random student backbone (implied by --dummy)")
    g.add_argument("--teacher", default="fasterrcnn_resnet50_fpn", choices=(*COCO_TEACHERS, *STUDENTS), metavar="ARCH",
                   help="fasterrcnn_resnet50_fpn: the paper's architecture, torchvision's COCO weights (37.0 AP; the "
                        "paper's detectron2 ones: 40.22); _v2: 46.7 AP, another recipe; or a student layout")
    g.add_argument("--teacher-ckpt", metavar="PATH",
                   help="teacher weights (a state dict, or a checkpoint of this script)")
    g.add_argument("--teacher-eval-images", type=int, default=0, help="score the teacher on N val images (0: all)")
    g = p.add_argument_group("distillation")
    g.add_argument("--distill", default="srd", choices=("none", "srd"), help="none: detection losses; srd "
                   "(Simple Recipe Distillation, the paper's): + the feature loss")
    g.add_argument("--feat-weight", type=float, default=1.0, help="weight of the feature term (the paper's: unstated)")
    g.add_argument("--alpha", type=float, default=4.0, help="alpha of the soft maximum log sum |z_s W_p - z_t|^alpha")
    g.add_argument("--norm", default="bn", choices=NORMS, help="normalisation of z_s W_p and z_t, no affine: "
                   "bn (the paper's, per channel over the batch's positions), gn (Table 6.1; eps 1e-4 where the "
                   "official code's has 0: a departure), ln, l2; none: no normalisation")
    g.add_argument("--projector", default="linear", choices=PROJECTORS, help="W_p at every position (a 1x1 "
                   "conv): linear (the paper's); mlp: Linear-BN-ReLU-Linear (our reading of the paper's 'MLP'); "
                   "mlp-plain: Linear-ReLU-Linear (the official code's); none: the identity")
    g.add_argument("--projector-hidden", type=int,
                   help="hidden width of the 'mlp' projector (default: the teacher's feature width)")
    g.add_argument("--distance", default="logsum", choices=DISTANCES, help="logsum: the paper's soft maximum; corr: "
                   "the official DeiT code's; mean: mean |d|^alpha (no log: Tables 6.3, 6.9; averaged over batch and "
                   "dimensions where the paper writes a squared norm: our reading); corr-nolog: the correlation form "
                   "without the log")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=12, help="epochs (the 1x schedule)")
    g.add_argument("--max-steps", type=int, help="cap on the steps of each epoch (smoke tests, benchmarks)")
    g.add_argument("--batch-size", type=int, default=2, help="images per process")
    g.add_argument("--lr", type=float, default=0.02, help="SGD lr per 16 images, scaled linearly to the global batch")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--wd", type=float, default=1e-4, help="weight decay")
    g.add_argument("--lr-milestones", type=int, nargs="+", default=[8, 11], help="lr x0.1 at these epochs")
    g.add_argument("--warmup-iters", type=int, default=1000, help="linear warm-up from lr/1000, at most an epoch")
    g = p.add_argument_group("system")
    g.add_argument("--amp", choices=("off", "bf16", "fp16"), help="autocast of the training backbones (default: bf16 "
                   "on GPUs that have it natively, else fp16; off on CPU); heads stay float32; every score is float32")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="NHWC memory layout, faster convolutions on GPUs (default: on with CUDA, off on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the backbones (the heads' shapes vary)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    g.add_argument("--workers", type=int,
                   help="data-loading processes per process (default: 4, at most this process's share of the cores)")
    g.add_argument("--seed", type=int, default=0, help="batches, flips, sizes, RPN/RoI samples: f(seed, epoch, rank)")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm for the student's batch norms (CUDA); the "
                   "distillers' keep per-GPU statistics, as their feature maps do")
    g = p.add_argument_group("outputs")
    g.add_argument("--log-every", type=int, default=20, help="print a progress line every N steps")
    g.add_argument("--score-thresh", type=float, default=0.05, help="keep detections scoring above this")
    g.add_argument("--out-dir", help="output folder (default: the folder of --resume, else "
                                     f"runs/{PROG}-<student>-<distill>, with -dummy for --dummy runs)")
    g.add_argument("--resume", metavar="auto|PATH", help="continue a run: auto, from the out-dir's last.pt if there is "
                   "one, else start (one command for the first launch and every restart); or a last.pt; flags not "
                   "given take the run's own values; with --evaluate, the weights to score (any format)")
    g.add_argument("--evaluate", action="store_true", help="score the student of --resume on val, write eval.json")
    args = parse_resuming(p, argv, resolve_defaults)  # a resume takes its run's flags for those not given
    for name in ("epochs", "batch_size", "log_every", "max_steps", "alpha", "projector_hidden", "max_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("lr", "wd"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if COCO is None:
        fail("pycocotools is not installed; pip install pycocotools")
    if min(args.min_size) <= 0:  # an extra check: a list of sizes
        fail(f"--min-size must be positive, got {args.min_size}")
    return args


def resolve_defaults(args):
    """The defaults that depend on other flags or on the machine, resolved once (args.json records them)."""
    cuda = args.device.startswith("cuda")
    if args.amp is None:  # bf16 where the GPU computes it natively; emulated (V100, T4) it is slower than fp16
        args.amp = ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16") if cuda else "off"
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    if args.workers is None:  # never more loader processes than cores: each would compete for them
        args.workers = max(1, min(4, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    args.out_dir = Path(args.out_dir or (Path(args.resume).parent if args.resume not in (None, "auto") else
                                         f"runs/{PROG}-{args.student}-{args.distill}" + "-dummy" * args.dummy))
    return args


# ---- the method: the student with its distillers (one per pair of FPN levels), the schedule, the training step ----
class StudentWithDistiller(nn.Module):
    """What DDP wraps: the student's training forward and the distillers, so the projectors W_p are averaged like the
    student's weights and stay identical on every rank; forward returns (detection losses, loss_feat or None, FPN maps).
    Backbone and FPN (nearly all the FLOPs) run under the caller's autocast; the RPN and RoI heads and the distillers
    stay in float32, as bf16's 8-bit mantissa would move box corners near x = 1000 by up to 4 px."""

    def __init__(self, student, distiller, levels, sync_bn=False):
        super().__init__()
        # --sync-bn syncs the student's batch norms alone, in place: the distillers keep per-GPU statistics, as their
        # maps do, and a synced BN in an MLP projector would make the CKA that rank 0 takes at a log step a collective
        self.student = nn.SyncBatchNorm.convert_sync_batchnorm(student) if sync_bn else student
        self.distiller, self.levels = distiller, levels

    def forward(self, batch, targets, features_t=None):
        features = self.student.backbone(batch.tensors)
        with torch.autocast(batch.tensors.device.type, enabled=False):
            features = {k: v.float() for k, v in features.items()}
            proposals, rpn_losses = self.student.rpn(batch, features, targets)
            _, roi_losses = self.student.roi_heads(features, proposals, batch.image_sizes, targets)
            loss_feat = None if features_t is None else sum(  # d(BN(z_s W_p), BN(z_t)) at every paired level
                self.distiller[ks](features[ks], features_t[kt].float()) for ks, kt in self.levels.items())
        return {**rpn_losses, **roi_losses}, loss_feat, features


def build_distiller(args, student, teacher):
    """--distill srd's FeatureDistillers, one per pair of FPN levels of one stride, with per-rank statistics (the FPN
    maps of a global batch are too large to gather): ({student level: teacher level}, an nn.ModuleDict of them)."""
    if teacher is None:
        return {}, nn.ModuleDict()
    levels, shapes = match_levels(student, teacher)
    return levels, nn.ModuleDict({
        ks: FeatureDistiller(shapes[0][ks][0], shapes[1][kt][0], args.projector, args.norm, args.distance, args.alpha,
                             global_batch=False, hidden=args.projector_hidden) for ks, kt in levels.items()})


def build_scheduler(optimizer, args, steps):
    """torchvision's detection schedule, stepped every iteration: a linear warm-up from 0.001 x lr over
    --warmup-iters (at most one epoch minus one step, as its engine.py), then x0.1 at each of --lr-milestones."""
    warmup_iters = min(args.warmup_iters, steps - 1)

    def lr_factor(it):  # it: optimizer steps taken so far
        warmup = min(1.0, 0.001 + 0.999 * it / warmup_iters) if warmup_iters else 1.0
        return warmup * 0.1 ** sum(it // steps >= m for m in args.lr_milestones)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def train_step(model, teacher, optimizer, scaler, autocast, args, batch, targets):
    """One step: the detection losses + feat_weight * the feature loss (``teacher``: the frozen teacher's backbone,
    x -> FPN maps); returns the unweighted terms (DET_LOSSES, then feat) and the student's FPN maps, on the device."""
    with autocast:
        features_t = None
        if teacher is not None:
            with torch.no_grad():
                features_t = teacher(batch.tensors)
        losses, loss_feat, features = model(batch, targets, features_t)
        loss_feat = torch.zeros((), device=batch.tensors.device) if loss_feat is None else loss_feat
        loss = sum(losses[k] for k in DET_LOSSES) + args.feat_weight * loss_feat
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    terms = torch.stack([*(losses[k].detach() for k in DET_LOSSES), loss_feat.detach()])
    return terms, {k: v.detach() for k, v in features.items()}


@torch.no_grad()
def match_levels(student, teacher):
    """Pair FPN levels by their measured stride, each teacher level once: {student: teacher}, and the levels'
    shapes. The ResNet and MobileNetV2 FPNs have '0'-'3' and 'pool' at strides 4-64: all five pair. torchvision's
    MobileNetV3 FPN has '0' and '1' both at stride 32 and 'pool' at 64: its deeper '1' meets the teacher's '3'."""
    x, shapes = torch.zeros(1, 3, 256, 256), []
    for model in (student, teacher):
        mode = model.training
        shapes.append({k: tuple(v.shape[1:]) for k, v in model.eval().backbone(x).items()})
        model.train(mode)
    by_size = {s[1:]: ks for ks, s in shapes[0].items()}  # map size (stride) -> the student's last level of that size
    return {by_size[t[1:]]: kt for kt, t in shapes[1].items() if t[1:] in by_size}, shapes


def transform(model, images, targets=None, channels_last=False):
    """Normalise, resize and pad: the ImageList that both backbones see."""
    batch, targets = model.transform(images, targets)
    if channels_last:
        batch.tensors = batch.tensors.contiguous(memory_format=torch.channels_last)
    return batch, targets


def main(argv=None):
    args, t_start = parse_args(argv), time.time()  # flags that cannot be right are refused here

    # ---- set-up: one code path for one process and for torchrun ----
    device, rank, world, autocast = set_up(args)
    distributed, is_main, global_batch = dist.is_initialized(), rank == 0, args.batch_size * world
    lr = args.lr * global_batch / 16  # linear scaling from detectron2's 0.02 per 16 images
    resumed, args_json = check_run(args, device, world)  # bad input: refused before anything is written
    if resumed is not None and args_json["resume"] == "auto" and resumed["epoch"] >= args.epochs:
        return finished(args, resumed["epoch"])  # the run is done: its summary, nothing changed

    # ---- data ----
    train_set, val_set = build_data(args)
    steps = count_steps(train_set, args, rank, world)  # aspect-ratio grouped batches, as many on every rank
    # val sharded by rank, nothing dropped, one image per batch as torchvision's reference: no padding moves a box
    val_loader = loader(val_set, [[(i, False)] for i in range(rank, len(val_set), world)], args, device)

    # ---- models: student, teacher, distiller ----
    student = build_student(args, args.student, not (args.no_pretrained_backbone or args.dummy or args.evaluate))
    if resumed is not None:
        load_weights(student, resumed, args.resume, "student")
    teacher, teacher_tag = build_teacher(args) if args.distill == "srd" and not args.evaluate else (None, None)
    levels, distiller = build_distiller(args, student, teacher)  # one W_p per pair of FPN levels of one stride
    for detector in filter(None, (student, teacher)):
        place(detector, args, device)  # on the device; the backbone channels-last and compiled where asked
    distiller.to(device)
    if args.evaluate:
        return evaluate_checkpoint(args, student, resumed, val_loader, device)

    # ---- optimisation ----
    model = StudentWithDistiller(student, distiller, levels, sync_bn=args.sync_bn and distributed)
    if distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=args.momentum,
                                weight_decay=args.wd)
    scheduler = build_scheduler(optimizer, args, steps)  # linear warm-up, then x0.1 at each milestone
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16")

    # ---- resume ----
    start_epoch, best, best_epoch = load_state(resumed, distiller, optimizer, scheduler, scaler)
    if is_main:  # the run writes from here on
        open_outputs(args.out_dir, args_json, start_epoch)
        print(f"args: {json.dumps(args_json)}\nworld size {world} | device {device} | amp {args.amp} | global batch "
              f"{global_batch} | lr {lr:g} | {steps} steps/epoch | params: student {n_params(student):.2f}m, "
              f"distiller {n_params(distiller):.3f}m, teacher {n_params(teacher):.2f}m | {len(train_set)} train / "
              f"{len(val_set)} val images")
        if resumed is not None:
            print(f"resuming {args.resume}: {start_epoch} epochs done, best AP {100 * best:.1f} (epoch {best_epoch})")
    teacher_metrics = score_teacher(args, teacher, teacher_tag, levels, val_set, device)

    # ---- training ----
    t_loop, total_steps, epoch_ips = time.time(), (args.epochs - start_epoch) * steps, []
    for epoch in range(start_epoch, args.epochs):
        torch.manual_seed(seed_of(args.seed, epoch, rank))  # sizes, RPN/RoI sampling: f(seed, epoch, rank)
        batches = train_batches(train_set.aspect, args.batch_size, args.seed, epoch, rank, world)[:steps]
        reset_peak_memory(device)  # the record's peak is this epoch's training
        interval = torch.zeros(len(DET_LOSSES) + 1, device=device)  # the detection terms and feat, on device
        seen, data_time, logged, epoch_sums, epoch_images = 0, 0.0, 0, [0.0] * len(interval), 0
        cka = []  # [global step, CKA of z_s and its projection, mean over the levels] at each log step: Figure 6.3
        t_epoch = t_log = t_ready = time.time()
        for step, (images, targets) in enumerate(loader(train_set, batches, args, device)):
            data_time += time.time() - t_ready
            images, targets = to_device(images, targets, device)
            batch, targets = transform(student, images, targets, args.channels_last)  # once, for both backbones
            terms, features = train_step(model, teacher.backbone if teacher is not None else None, optimizer, scaler,
                                         autocast, args, batch, targets)
            scheduler.step()
            interval += terms
            seen += len(images)
            if (step + 1) % args.log_every == 0 or step + 1 == steps:  # the only host-device syncs of the loop
                stats = torch.cat([interval, interval.new_tensor([seen])])
                if distributed:
                    dist.all_reduce(stats)
                *sums, n_images = stats.tolist()
                mean = [v / ((step + 1 - logged) * world) for v in sums]
                stop_if_not_finite(dict(zip([*DET_LOSSES.values(), "feat"], mean)), epoch, step)  # on every rank
                now, done = time.time(), (epoch - start_epoch) * steps + step + 1
                if is_main:
                    det = " ".join(f"{short} {v:.3f}" for short, v in zip(DET_LOSSES.values(), mean))
                    log_line(epoch, args.epochs, step, steps, f"det {sum(mean[:-1]):.3f} ({det})" + (
                             f" feat {mean[-1]:.3f}" if teacher is not None else ""), optimizer.param_groups[0]["lr"],
                             n_images / (now - t_log), data_time / (step + 1 - logged),
                             (now - t_loop) / done * (total_steps - done))
                    if teacher is not None:
                        level_cka = [projector_cka(distiller[ks], features[ks]) for ks in levels]
                        cka.append([epoch * steps + step + 1, torch.stack(level_cka).mean().item()])
                epoch_sums, epoch_images = [a + b for a, b in zip(epoch_sums, sums)], epoch_images + n_images
                interval.zero_()
                t_log, data_time, logged, seen = now, 0.0, step + 1, 0
            t_ready = time.time()
        epoch_s, peak_mb = time.time() - t_epoch, peak_memory_mb(device)  # the peak before scoring: training's
        epoch_ips.append(epoch_images / epoch_s)

        # ---- the epoch's score, checkpoint and record ----
        broadcast_buffers(student)  # every rank scores the model rank 0 saves (BN statistics, where they train)
        metrics = evaluate(student, val_loader, device, args.channels_last)
        if best is None or metrics["AP"] > best:
            best, best_epoch = metrics["AP"], epoch + 1
        if is_main:
            mean = [v / (steps * world) for v in epoch_sums]
            record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "loss_det": sum(mean[:-1]),
                      **dict(zip(DET_LOSSES, mean)), "loss_kd": None, "loss_feat": mean[-1] if teacher else None,
                      **metrics, "eval_images": metrics["images"], "images_per_s": epoch_ips[-1], "epoch_s": epoch_s,
                      "peak_mem_mb": peak_mb}
            if teacher is not None:  # every singular value of each level's W_p, sorted: the paper's Figure 6.2
                spectra = {ks: projector_spectrum(d) for ks, d in distiller.items()}
                record["projector_sv"] = {ks: None if sv is None else sv.tolist() for ks, sv in spectra.items()}
                record["projector_cka"] = cka
            write_epoch(args.out_dir, training_state(student, distiller if teacher else None, optimizer, scheduler,
                                                     scaler, epoch + 1, best, best_epoch, args_json), record)
            print(f"epoch {epoch + 1}/{args.epochs} | val {fmt(metrics)} on {metrics['images']} images | best AP "
                  f"{100 * best:.1f} (epoch {best_epoch}) | {epoch_s:.0f} s | peak {record['peak_mem_mb']:.0f} MB",
                  flush=True)

    # ---- summary ----
    summary = write_summary(args, metrics, best, best_epoch, teacher_metrics, levels, t_start,
                            sum(epoch_ips) / len(epoch_ips), world) if is_main else None
    if distributed:
        dist.destroy_process_group()
    return summary


# ==== Appendix: the plumbing a reader of the method can skip (data, model zoo, teacher weights, checkpoints) ====
# ---- data: COCO boxes as Faster R-CNN targets, aspect-ratio grouped batches ----
class CocoBoxes(CocoDetection):
    """COCO images (uint8, CHW) with targets ``{boxes (xyxy), labels, image_id}``. Crowd boxes and boxes without
    area after clipping are dropped; for training, images left without a box are skipped. Items are addressed by
    ``(index, flip)``, so the sampler decides the flips."""

    def __init__(self, root, ann_file, train):
        with redirect_stdout(io.StringIO()):  # pycocotools prints progress
            super().__init__(root, ann_file)
        if train:
            self.ids = [i for i in self.ids if len(self.target(i)["boxes"])]
        self.aspect = [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.ids]

    def target(self, image_id):
        info = self.coco.imgs[image_id]
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2].clamp_(0, info["width"])
        boxes[:, 1::2].clamp_(0, info["height"])
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        return {"boxes": boxes[keep], "labels": labels[keep], "image_id": image_id}

    def __getitem__(self, key):
        index, flip = key
        image_id = self.ids[index]
        image = decode_image(os.path.join(self.root, self.coco.imgs[image_id]["file_name"]), mode=ImageReadMode.RGB)
        return maybe_flip(image, self.target(image_id), flip)


class DummyBoxes(torch.utils.data.Dataset):
    """Random landscape and portrait images, 1-5 boxes each, seeded by index, with their pycocotools ground truth."""

    def __init__(self, n, size, offset):
        self.ids = list(range(offset, offset + n))
        self.shapes = [(size, size * 4 // 3) if i % 2 else (size * 4 // 3, size) for i in self.ids]
        self.aspect = [w / h for h, w in self.shapes]
        self.targets = [self.make_target(i) for i in range(n)]
        boxes = [(t["image_id"], int(c), x0, y0, x1 - x0, y1 - y0)
                 for t in self.targets for (x0, y0, x1, y1), c in zip(t["boxes"].tolist(), t["labels"])]
        self.coco = COCO()
        self.coco.dataset = {
            "images": [{"id": i, "height": h, "width": w} for i, (h, w) in zip(self.ids, self.shapes)],
            "categories": [{"id": c} for c in range(1, NUM_CLASSES)],
            "annotations": [{"id": k, "image_id": i, "category_id": c, "bbox": [x, y, w, h], "area": w * h,
                             "iscrowd": 0} for k, (i, c, x, y, w, h) in enumerate(boxes, 1)]}
        with redirect_stdout(io.StringIO()):
            self.coco.createIndex()

    def make_target(self, index):
        g = torch.Generator().manual_seed(self.ids[index])
        (h, w), n = self.shapes[index], int(torch.randint(1, 6, (), generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.7
        wh = (0.1 + 0.9 * torch.rand(n, 2, generator=g)) * torch.tensor([w, h]) * 0.3
        labels = torch.randint(1, NUM_CLASSES, (n,), generator=g)
        return {"boxes": torch.cat([xy, xy + wh], 1), "labels": labels, "image_id": self.ids[index]}

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, key):
        index, flip = key
        g = torch.Generator().manual_seed(self.ids[index])
        image = torch.randint(0, 256, (3, *self.shapes[index]), dtype=torch.uint8, generator=g)
        target = self.targets[index]
        return maybe_flip(image, {**target, "boxes": target["boxes"].clone()}, flip)


def maybe_flip(image, target, flip):
    if flip:  # horizontal flip, the only augmentation of the 1x schedule
        image, w = image.flip(-1), image.shape[-1]
        target["boxes"][:, [0, 2]] = w - target["boxes"][:, [2, 0]]
    return image, target


def build_data(args):
    """(train set, val set): COCO 2017 under --data-dir, or --dummy's random boxes. A split that is missing or
    ill-formed fails with what is wrong and the expected layout."""
    if args.dummy:
        return DummyBoxes(256, args.min_size[-1], 1), DummyBoxes(7, args.min_size[-1], 10_001)
    sets = []
    for split in ("train2017", "val2017"):
        ann_file = os.path.join(args.data_dir, "annotations", f"instances_{split}.json")
        image_dir = os.path.join(args.data_dir, split)
        if not os.path.isfile(ann_file):
            fail(f"missing annotation file {ann_file}; {LAYOUT}")
        if not os.path.isdir(image_dir):
            fail(f"missing image folder {image_dir}; {LAYOUT}")
        try:
            ds = CocoBoxes(image_dir, ann_file, train=split == "train2017")
            files = [image["file_name"] for image in ds.coco.imgs.values()]
            categories = [c["id"] for c in ds.coco.dataset.get("categories", [])]
        except Exception as e:  # not JSON, or JSON without the COCO fields
            fail(f"ill-formed annotation file {ann_file} ({type(e).__name__}: {' '.join(str(e).split())[:100]}); "
                 f"{LAYOUT}")
        present = set(os.listdir(image_dir))
        missing = [f for f in files if f not in present]
        if not files or len(missing) == len(files):
            fail(f"no images found: {ann_file} lists {len(files)} images, none of them in {image_dir}; {LAYOUT}")
        if missing:
            fail(f"{len(missing)} of the {len(files)} images listed in {ann_file} are missing from {image_dir} "
                 f"(e.g. {missing[0]}); re-extract {split}.zip")
        if not ds.ids or not ds.coco.anns:
            fail(f"no image in {ann_file} has a (non-crowd, non-empty) box; {LAYOUT}")
        if not categories or max(categories) >= NUM_CLASSES or min(categories) < 1:
            fail(f"the category ids of {ann_file} must lie in 1..{NUM_CLASSES - 1} (COCO's ids, the labels of "
                 f"torchvision's heads), got {min(categories, default=None)}..{max(categories, default=None)}; "
                 f"{LAYOUT}")
        sets.append(ds)
    return sets


def train_batches(aspect, batch_size, seed, epoch, rank, world):
    """This rank's batches for one epoch, grouped by aspect ratio (width / height) in the bins of torchvision's
    reference (``create_aspect_ratio_groups``, factor 3), so that padding a batch to one size wastes little. Order
    and flips are functions of (seed, epoch), so a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(seed_of(seed, epoch))
    order = torch.randperm(len(aspect), generator=g).tolist()
    flips = (torch.rand(len(aspect), generator=g) < 0.5).tolist()
    edges = 2 ** torch.linspace(-1, 1, 7, dtype=torch.float64)  # bisect_right into these, as the reference
    bins, batches = torch.bucketize(torch.tensor(aspect, dtype=torch.float64), edges, right=True).tolist(), []
    for b in sorted(set(bins)):
        group = [(i, flips[i]) for i in order if bins[i] == b]
        batches += [group[j:j + batch_size] for j in range(0, len(group), batch_size)]
    batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
    per_rank = len(batches) // world  # as many on every rank; the few left over differ every epoch
    return batches[rank * per_rank:(rank + 1) * per_rank]


def count_steps(train_set, args, rank, world):
    """The steps of an epoch: this rank's aspect-ratio grouped batches, capped by --max-steps."""
    steps = len(train_batches(train_set.aspect, args.batch_size, args.seed, 0, rank, world))
    if steps == 0:
        fail(f"{len(train_set)} training images make no batch for each of {world} processes; lower --batch-size")
    return min(steps, args.max_steps or steps)


def to_device(images, targets, device):
    """A batch on the device: uint8 images as floats in [0, 1], and the targets' boxes and labels."""
    return ([image.to(device, non_blocking=True).float().div_(255) for image in images],
            [{k: t[k].to(device, non_blocking=True) for k in ("boxes", "labels")} for t in targets])


def collate(batch):  # top level, not a lambda: loader workers may have to pickle it
    return tuple(zip(*batch))


def loader(dataset, batches, args, device):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=args.workers,
                                       pin_memory=device.type == "cuda")


# ---- models: torchvision Faster R-CNNs, COCOeval ----
def build_student(args, name, pretrained):
    """A Faster R-CNN + FPN on the backbone ``name`` (--student, or a teacher in a student layout), failing in one
    line when torchvision cannot fetch the backbone's ImageNet weights (offline). As in torchvision's builders, a
    pretrained backbone (IMAGENET1K_V1, the weights they use, not V2) keeps its BN frozen and its stem and first
    stage fixed; a random one trains everything. ``mobilenet_v2`` is ReviewKD's detectron2 student (the ends of
    its stride-4/8/16/32 stages), BN frozen when pretrained and every layer trained (FREEZE_AT 0)."""
    weights = "IMAGENET1K_V1" if pretrained else None
    try:
        if name == "mobilenet_v2":
            body = mobilenet_v2(weights=weights, norm_layer=FrozenBatchNorm2d if weights else nn.BatchNorm2d)
            backbone = BackboneWithFPN(body.features, {"3": "0", "6": "1", "13": "2", "17": "3"}, [24, 32, 96, 320],
                                       256, extra_blocks=LastLevelMaxPool())
            return detection.FasterRCNN(backbone, **detector_kwargs(args))
        if name == "mobilenet_v3_large":
            return detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=weights,
                                                               **detector_kwargs(args))
        backbone = resnet_fpn_backbone(backbone_name=name, weights=weights, trainable_layers=3 if weights else 5,
                                       norm_layer=FrozenBatchNorm2d if weights else nn.BatchNorm2d)
        return detection.FasterRCNN(backbone, **detector_kwargs(args))
    except OSError as e:
        fail(f"could not load the ImageNet weights of the {name} backbone ({type(e).__name__}); connect once so "
             "that torchvision caches them, or pass --no-pretrained-backbone")


def place(detector, args, device):
    """The detector on the device, its backbone channels-last and compiled where the flags ask."""
    detector.to(device)
    if args.channels_last:
        detector.backbone.to(memory_format=torch.channels_last)
    if args.compile:
        detector.backbone.compile()


def detector_kwargs(args):
    return dict(num_classes=NUM_CLASSES, min_size=tuple(args.min_size), max_size=args.max_size,
                box_score_thresh=args.score_thresh)


def build_teacher(args):
    """(teacher, where its weights come from): frozen, in eval mode, with --teacher-ckpt's weights,
    torchvision's COCO weights, or random under --dummy."""
    random_init = args.dummy and not args.teacher_ckpt
    if args.teacher in COCO_TEACHERS:
        try:
            weights = None if args.teacher_ckpt or random_init else "DEFAULT"
            teacher = getattr(detection, args.teacher)(weights=weights, weights_backbone=None, **detector_kwargs(args))
        except OSError as e:  # offline
            fail(f"could not load torchvision's COCO weights of {args.teacher} ({type(e).__name__}); "
                 "pass --teacher-ckpt PATH")
    elif args.teacher_ckpt or random_init:
        teacher = build_student(args, args.teacher, False)
    else:
        fail(f"--teacher {args.teacher} has no COCO weights in torchvision; pass --teacher-ckpt PATH "
             "(e.g. the best.pt of a --distill none run)")
    if args.teacher_ckpt:
        load_weights(teacher, read_checkpoint(args.teacher_ckpt), args.teacher_ckpt, "teacher")
    tag = ("RANDOM weights (--dummy without --teacher-ckpt)" if random_init
           else args.teacher_ckpt or "torchvision's COCO weights")
    return teacher.eval().requires_grad_(False), tag


@torch.no_grad()
def evaluate(model, loader, device, channels_last=False):
    """COCO bbox AP (COCOeval) of ``model`` over the whole val set, and the number of images: this rank's
    come from ``loader``, the detections of all ranks are gathered, so every image counts once. Inference is
    GeneralizedRCNN's, written out, in float32 whatever --amp trains in: a score never depends on --amp."""
    was_training, world = model.training, dist.get_world_size() if dist.is_initialized() else 1
    model.eval()
    detections, image_ids = [], []
    with float32_scores():
        for images, targets in loader:
            images = [image.to(device, non_blocking=True).float().div_(255) for image in images]
            batch, _ = transform(model, images, channels_last=channels_last)
            features = model.backbone(batch.tensors)
            proposals, _ = model.rpn(batch, features)
            found, _ = model.roi_heads(features, proposals, batch.image_sizes)
            found = model.transform.postprocess(found, batch.image_sizes, [tuple(image.shape[-2:]) for image in images])
            for target, det in zip(targets, found):  # boxes in the original images' pixels
                boxes = det["boxes"].cpu()
                boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
                image_ids.append(target["image_id"])
                detections += [{"image_id": target["image_id"], "category_id": c, "bbox": [round(v, 2) for v in b],
                                "score": round(s, 4)}
                               for b, c, s in zip(boxes.tolist(), det["labels"].tolist(), det["scores"].tolist())]
    model.train(was_training)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (detections, image_ids))
        detections, image_ids = [d for g in gathered for d in g[0]], [i for g in gathered for i in g[1]]
    metrics = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        coco_gt = loader.dataset.coco
        with redirect_stdout(io.StringIO()):  # COCOeval over exactly these images
            ev = COCOeval(coco_gt, coco_gt.loadRes(detections) if detections else COCO(), "bbox")
            ev.params.imgIds = sorted(image_ids)
            ev.evaluate(), ev.accumulate(), ev.summarize()
        metrics = [{k: (None if v < 0 else round(float(v), 5)) for k, v in zip(METRICS, ev.stats)}]  # -1: no box
    if world > 1:
        dist.broadcast_object_list(metrics)
    return {**metrics[0], "images": len(image_ids)}


def fmt(metrics):
    return " ".join(f"{k} {'-' if metrics[k] is None else f'{100 * metrics[k]:.1f}'}" for k in METRICS)


# ---- the run's bookkeeping: this task's ----
def evaluate_checkpoint(args, student, resumed, val_loader, device):
    """--evaluate: the COCO box AP of --resume's student (already loaded): printed, written to eval.json, returned."""
    record = {**evaluate(student, val_loader, device, args.channels_last), "checkpoint": args.resume}
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"{args.resume} (epoch {resumed.get('epoch')}): {fmt(record)} on {record['images']} val images")
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        save_atomic(json.dumps(record, indent=2) + "\n", Path(args.out_dir) / "eval.json")
    if dist.is_initialized():
        dist.destroy_process_group()
    return record


def load_state(resumed, distiller, optimizer, scheduler, scaler):
    """(epochs done, best AP, its epoch): a new run's, or those of the --resume checkpoint, whose distiller,
    optimizer, scheduler and scaler states are loaded (its student already is)."""
    if resumed is None:
        return 0, None, None
    distiller.load_state_dict(resumed["distiller"] or {})
    optimizer.load_state_dict(resumed["optimizer"])
    scheduler.load_state_dict(resumed["scheduler"])
    if resumed["scaler"]:  # a bf16 or float32 run saved a disabled scaler's {}: resuming it in fp16 starts afresh
        scaler.load_state_dict(resumed["scaler"])
    return resumed["epoch"], resumed["best"], resumed["best_epoch"]


def score_teacher(args, teacher, tag, levels, val_set, device):
    """The teacher's weights and distilled levels, and its COCO metrics on the first --teacher-eval-images val images
    (None without a teacher), printed with a warning when torchvision's weights score more than TEACHER_TOLERANCE AP
    off their published AP."""
    if teacher is None:
        return None
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if rank == 0:
        print(f"teacher {args.teacher} with {tag}; distilled FPN levels (student: teacher) {levels}")
    n_check = min(args.teacher_eval_images or len(val_set), len(val_set))
    metrics = evaluate(teacher, loader(val_set, [[(i, False)] for i in range(rank, n_check, world)], args, device),
                       device, args.channels_last)
    published = COCO_TEACHERS.get(args.teacher) if tag.startswith("torchvision") else None
    if rank == 0:
        n, ap = metrics["images"], 100 * metrics["AP"]
        print(f"teacher val: {fmt(metrics)} on {n} images")
        if published and abs(ap - published) > TEACHER_TOLERANCE:
            print(f"warning: {args.teacher} scores AP {ap:.1f} on {n} val images, published {published} on all "
                  "5,000; check --data-dir and --min-size/--max-size (800/1333)")
    return metrics


def write_summary(args, metrics, best, best_epoch, teacher_metrics, levels, t_start, images_per_s, world):
    """summary.json, the run in one record (what main returns), and the last line; best AP is a diagnostic."""
    summary = {"metric": "AP", "best": best, "best_epoch": best_epoch, "last": metrics["AP"], "headline": "last",
               "teacher": teacher_metrics["AP"] if teacher_metrics else None, "student_arch": args.student,
               "teacher_arch": args.teacher if teacher_metrics else None, "distill": args.distill,
               "wall_s": time.time() - t_start, "images_per_s": images_per_s, "peak_mem_mb": run_peak_mb(args.out_dir),
               "world_size": world, "versions": versions(), "teacher_metrics": teacher_metrics, "levels": levels}
    save_atomic(json.dumps(summary, indent=2) + "\n", Path(args.out_dir) / "summary.json")
    print(f"done: best AP {100 * best:.1f} (epoch {best_epoch}), last AP {100 * metrics['AP']:.1f} (the headline) | "
          f"{summary['wall_s'] / 60:.1f} min | {args.out_dir}")
    return summary


# ---- checkpoints and the run's bookkeeping, word for word the same in every script ----
def read_checkpoint(path):
    """torch.load with weights_only=True: checkpoints are untrusted input (tensors and plain containers only)."""
    if not Path(path).is_file():
        fail(f"{path}: no such file; pass the path of a checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, a text file, an unsafe pickle ...
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        fail(f"{path} is not a torch checkpoint ({type(e).__name__}: {reason}); pass a file written by torch.save")


def load_weights(model, checkpoint, path, what):
    """Load a state dict strictly: bare, or under 'model', 'state_dict' or 'student'; 'module.' and '_orig_mod.'
    prefixes stripped. A mismatch fails naming a few missing, unexpected and wrongly shaped keys."""
    state = checkpoint
    if isinstance(state, dict):
        state = next((state[k] for k in ("model", "state_dict", "student") if isinstance(state.get(k), dict)), state)
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        fail(f"{path} holds no state dict (nor one under 'model', 'state_dict' or 'student'); pass a model checkpoint")
    state = {re.sub(r"^((module|_orig_mod)\.)+", "", k): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]  # absent in old files
    unexpected = [k for k in state if k not in own]
    resized = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
               if k in state and state[k].shape != v.shape]
    if missing or unexpected or resized:
        few = lambda keys: ", ".join(keys[:3]) + (f" (+{len(keys) - 3})" if len(keys) > 3 else "") or "none"
        fail(f"{path} does not fit the {what}: missing {few(missing)}; unexpected {few(unexpected)}; "
             f"wrong shape {few(resized)}; pass a checkpoint of that architecture")
    model.load_state_dict(state)


def save_atomic(obj, path):
    """Write a temp file in the same folder, then rename it: a crash never leaves half a file, nor loses the last;
    a write stopped midway (Ctrl-C, SIGTERM) leaves no temp file either."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    try:
        if isinstance(obj, str):
            tmp.write_text(obj)
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def seed_of(*parts):
    """A 32-bit seed that is a function of ``parts`` (seed, epoch, rank or index) and nothing else."""
    return int(np.random.SeedSequence(parts).generate_state(1)[0])


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's max RSS (KiB on Linux)


def run_peak_mb(out_dir):
    """The run's peak memory: the highest of its epochs' training peaks in metrics.jsonl, a resumed run's included."""
    return max(json.loads(line)["peak_mem_mb"] for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines())


def reset_peak_memory(device):
    """Start an epoch's peak memory afresh (CUDA; on the CPU the peak is the process's max RSS, which never resets)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@contextmanager
def float32_scores():
    """True float32 inside, TF32 off for matmuls and convolutions, whatever --amp trains in: a score must not depend
    on the speed flags. These are torch's older TF32 switches, which torch.compile reads (and, where the newer
    fp32_precision API set TF32, refuses to read)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def n_params(module):  # in millions
    return sum(p.numel() for p in module.parameters()) / 1e6 if module is not None else 0.0


def versions():
    """The software of a run, for summary.json; None for a package that is not installed (timm, say)."""
    found = {}
    for package in ("torch", "torchvision", "timm"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return {"python": platform.python_version(), **found, "cuda": torch.version.cuda}


def set_up(args):
    """One code path for one process and for torchrun (whose RANK means DDP, one process per GPU): (device, rank,
    world size, the autocast context of --amp), every rank seeded alike."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        device = torch.device(args.device)
    except RuntimeError:
        fail(f"unknown --device {args.device!r}; pass cuda, cuda:N or cpu")
    if device.type == "cuda":  # an explicit index for set_device
        if not torch.cuda.is_available():
            fail(f"--device {args.device} but CUDA is not available; pass --device cpu")
        # modulo the GPUs it sees: a launcher may show each process its own GPU alone (Slurm --gpus-per-task=1)
        local_rank = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        device = torch.device("cuda", local_rank if "RANK" in os.environ else device.index or 0)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = FIXED_INPUT_SIZE  # cuDNN tunes its kernels once per input size
        # --amp off trains in true float32; bf16 and fp16 keep TF32 for what autocast leaves in float32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.amp != "off"
    if "RANK" in os.environ:
        cuda = device.type == "cuda"
        # torchrun's agent keeps one key-value store across --max-restarts, and torch 2.14 no longer prefixes the keys
        # of each attempt: a restarted rank that starts first reads its peers' addresses of the attempt before,
        # connects to no one ("Gloo connectFullMesh failed ... Connection refused") and ends the job. The scripts
        # give the other rank seconds to start first (their imports), minimal scripts milliseconds. Prefixed here.
        store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}",
                                 next(dist.rendezvous("env://"))[0])
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world,
                                device_id=device if cuda else None)
    torch.manual_seed(args.seed)  # the same on every rank: a model DDP does not wrap (the teacher) is one model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    return device, rank, world, torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def resume_from(args):
    """The checkpoint that a run continues: --resume PATH, or with --resume auto the out-dir's last.pt when a run left
    one there (None: the run starts)."""
    if args.resume != "auto":
        return args.resume
    last = Path(args.out_dir) / "last.pt"
    return last if last.is_file() else None


def parse_resuming(parser, argv, resolve):
    """``parser.parse_args(argv)`` with the defaults that depend on other flags resolved by ``resolve``. A resume
    continues its run as it was: a flag not given takes the value that the checkpoint recorded, a flag given
    overrides it (check_run refuses where RESUME_MUST_MATCH forbids); ``flags_from_checkpoint`` names the flags that
    the checkpoint changed (args.json and the start line show them)."""
    args, recorded = resolve(parser.parse_args(argv)), {}
    path = None if args.evaluate else resume_from(args)
    checkpoint = read_checkpoint(path) if path else None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("args"), dict):  # else check_run refuses the file
        recorded = {name: value for name, value in checkpoint["args"].items()
                    if hasattr(args, name) and name not in ("resume", "evaluate", "out_dir")}
        parser.set_defaults(**recorded, out_dir=args.out_dir)
    resumed = resolve(parser.parse_args(argv)) if recorded else args
    resumed.flags_from_checkpoint = sorted(name for name in recorded if getattr(resumed, name) != getattr(args, name))
    return resumed


def check_run(args, device, world):
    """The bad input every script refuses alike, before anything is written (the device's, --evaluate's, the
    out-dir's, a --resume that is not this run's), and --resume auto made a path (or None, a new run): returns (the
    checkpoint to continue or to score, or None; the flags as JSON)."""
    out_dir, args_json = Path(args.out_dir), json.loads(json.dumps(vars(args), default=str))
    if args.amp == "fp16" and device.type != "cuda":  # one policy in the four scripts: refused, not ignored
        fail("--amp fp16 needs CUDA (its GradScaler); use --amp bf16 or off on CPU")
    if args.sync_bn and device.type != "cuda":
        fail("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernels); drop it on CPU")
    if args.evaluate and args.resume in (None, "auto"):
        fail("--evaluate needs --resume PATH, the checkpoint whose student to score")
    if out_dir.exists() and not out_dir.is_dir():
        fail(f"--out-dir {out_dir} is a file; pass a folder")
    if not args.resume and ((out_dir / "args.json").exists() or (out_dir / "last.pt").exists()):
        fail(f"{out_dir} already holds a run; pass --resume auto (or --resume {out_dir}/last.pt) to continue it, "
             "or choose another --out-dir")
    args.resume = resume_from(args)
    resumed = read_checkpoint(args.resume) if args.resume else None
    if resumed is None or args.evaluate:  # --evaluate scores any file of student weights
        return resumed, args_json
    state = {"student", "distiller", "optimizer", "scheduler", "scaler", "epoch", "best", "best_epoch", "args"}
    if not (isinstance(resumed, dict) and state <= resumed.keys() and isinstance(resumed["args"], dict)):
        fail(f"{args.resume} is not a training checkpoint of {PROG}; pass the last.pt of one of its runs, "
             "or score it with --evaluate")
    mismatched = [flag for flag in RESUME_MUST_MATCH if resumed["args"].get(flag) != args_json[flag]]
    if mismatched:
        fail(f"{args.resume} was trained with " + " and with ".join(f"--{flag.replace('_', '-')} "
             f"{resumed['args'].get(flag)}, not {args_json[flag]}" for flag in mismatched) + "; drop those flags to "
             "resume it as it was (a resume takes the run's own)")
    if resumed.get("world_size", world) != world:  # the global batch, hence the lr and the steps per epoch
        fail(f"{args.resume} was trained by {resumed['world_size']} processes, not {world}; use as many")
    if resumed["epoch"] >= args.epochs and args_json["resume"] != "auto":  # auto: a finished run, main says so
        fail(f"{args.resume} has trained {resumed['epoch']} epochs already; pass --epochs above {resumed['epoch']}")
    return resumed, args_json


def finished(args, epochs_done):
    """--resume auto of a run that has trained its --epochs: one line, nothing written, and the run's summary (None
    if it was stopped between its last checkpoint and summary.json)."""
    path = Path(args.out_dir) / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else None
    if os.environ.get("RANK", "0") == "0":
        print(f"{args.out_dir} has trained its {epochs_done} epochs: " + (
              f"its summary is {path}" if summary else "stopped before summary.json; metrics.jsonl has every epoch"))
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


def open_outputs(out_dir, run_json, start_epoch):
    """The run writes from here on: the out-dir, args.json, and metrics.jsonl without the records of the epochs
    after the resumed checkpoint (a resume from an earlier checkpoint, a best.pt say, redoes those epochs)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_atomic(json.dumps(run_json, indent=2) + "\n", out_dir / "args.json")
    metrics_path = out_dir / "metrics.jsonl"
    if metrics_path.is_file():
        records = [line for line in metrics_path.read_text().splitlines(True) if line.strip()]
        save_atomic("".join(line for line in records if json.loads(line)["epoch"] <= start_epoch), metrics_path)


def stop_if_not_finite(losses, epoch, step):
    """Exit 3 on every rank when a logged mean loss is not finite; last.pt is still the end of the previous epoch."""
    if not all(map(math.isfinite, losses.values())):
        terms = " ".join(f"{name} {value:.4g}" for name, value in losses.items())
        fail(f"non-finite loss at epoch {epoch + 1} step {step + 1}: {terms}; last.pt still holds epoch {epoch}; "
             "lower --lr, or resume with --amp bf16/off", code=3)


def log_line(epoch, epochs, step, steps, losses, lr, images_per_s, data_s, eta_s):
    """The line of every --log-every steps: position, the interval's mean losses, lr, img/s, data wait, time left."""
    print(f"epoch {epoch + 1}/{epochs} step {step + 1}/{steps} | {losses} | lr {lr:.4g} | "
          f"{images_per_s:.{0 if images_per_s >= 100 else 1}f} img/s | data {1000 * data_s:.1f} ms/step | "
          f"eta {datetime.timedelta(seconds=round(eta_s))}", flush=True)


def write_epoch(out_dir, checkpoint, record):
    """The epoch's line of metrics.jsonl, best.pt on a new best, then last.pt, each written whole: a run stopped at
    any point has a record for last.pt's epoch, and a resume drops the records after it (open_outputs)."""
    out_dir = Path(out_dir)
    metrics = out_dir / "metrics.jsonl"
    save_atomic((metrics.read_text() if metrics.is_file() else "") + json.dumps(record) + "\n", metrics)
    if checkpoint["best_epoch"] == checkpoint["epoch"]:
        save_atomic(checkpoint, out_dir / "best.pt")
    save_atomic(checkpoint, out_dir / "last.pt")


def training_state(student, distiller, optimizer, scheduler, scaler, epochs_done, best, best_epoch, args_json):
    """What last.pt holds: all a --resume needs to go on as if the run had never stopped, and the flags it ran with."""
    return {"student": student.state_dict(), "distiller": distiller.state_dict() if distiller is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epochs_done, "best": best, "best_epoch": best_epoch, "args": args_json,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1}


def broadcast_buffers(module):
    """Rank 0's buffers (the batch-norm statistics) on every rank: every rank scores the model rank 0 saves."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def preempted(signum, frame):
    """SIGTERM (a scheduler preempting or requeueing the job, torchrun stopping its workers) stops the run as Ctrl-C
    does, between two Python steps: every file is whole (save_atomic), and last.pt is where --resume goes on."""
    raise KeyboardInterrupt("SIGTERM")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, preempted)
    try:
        main()
    except KeyboardInterrupt as e:  # one line, not a traceback: where the run stands and how to go on
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the line short
        sigterm, last = e.args == ("SIGTERM",), Path(parse_args().out_dir) / "last.pt"
        fail(("stopped by SIGTERM" if sigterm else "interrupted") + (
             f"; the same command with --resume auto (or --resume {last}) goes on, repeating the epoch it stopped in"
             if last.is_file() else " before its first epoch ended; --resume auto starts it again"),
             143 if sigterm else 130)
