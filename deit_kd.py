"""DeiT distilled with a projector: the data-efficient transformers of Miles & Mikolajczyk, AAAI 2024.

A DeiT student with the paper's convolutional stem, distilled from a frozen RegNetY-160 (DeiT's teacher, 82.6%),
reaches 77.2% ImageNet top-1 as DeiT-Ti and 82.1% as DeiT-S (thesis Table 6.5):

                alone   DeiT⚗ (hard distillation)   CivT   DearKD   USKD   this recipe
    DeiT-Ti      72.2          74.5                  74.9    74.8    75.0       77.2
    DeiT-S       79.8          81.2                  82.0    81.5    80.8       82.1

and translation equivariance mu_T of the DeiT-S blocks (thesis Table 6.7; ``--evaluate`` reports it): DeiT
1.52 +- 0.15, CivT 0.13 +- 0.05, this recipe 0.04 +- 0.02. On ImageFolder ImageNet (DIR/train/<class>/*.JPEG,
DIR/val/<class>/*.JPEG), with DeiT's regnety_160-a5fe301d.pth (or timm's ``regnety_160.deit_in1k`` weights):

    python deit_kd.py --data-dir /data/imagenet --teacher-ckpt regnety_160-a5fe301d.pth    # DeiT-Ti, 77.2
    python deit_kd.py --data-dir /data/imagenet --student deit_small --teacher-ckpt ...    # DeiT-S, 82.1
    torchrun --nproc_per_node=8 deit_kd.py --data-dir /data/imagenet --teacher-ckpt ...    # 8 x 64 = 512 images
    python deit_kd.py --evaluate --resume runs/deit_kd-deit_tiny-srd/best.pt --data-dir /data/imagenet  # + mu_T
    python deit_kd.py --dummy --img-size 64 --epochs 1 --max-steps 20          # the whole pipeline, no files

The loss: CE(head(cls token), mixed targets) + kd_weight * KL(teacher || head_conv(conv token)) * T^2 +
feat_weight * D(BN(mean of patch tokens W_p), BN(z_t)), with z_t the teacher's pooled 3024-d feature, W_p linear
(192 or 384 -> 3024), BN without affine parameters on both sides, D the released DeiT code's correlation distance
(``--distance corr``; ``logsum`` is the paper's general form). The conv stem: three conv-BN-ReLU layers of 64
channels (7x7 stride 2, 3x3, 3x3) and an 8x8 stride-8 convolution (14x14 tokens at 224 px); the conv token is the
mean of the patch embeddings; evaluation averages the two heads. ``--stem patch``: timm's distilled DeiT.
Recipe (thesis §6.4.2: DeiT's schedule and augmentation, 300 epochs, a batch of 512 on one GPU; the rest as the
official code, whose config batch is 256): AdamW, wd 0.05, lr 5e-4 x global batch / 512, per-step cosine with a
20-epoch warm-up, clipping at 15, RandAugment, random erasing, Mixup/CutMix, label smoothing 0.1; evaluation in
float32. A run prints the teacher's top-1, the losses every --log-every steps and the top-1 of every epoch, and
writes args.json, metrics.jsonl, last.pt, best.pt and summary.json to --out-dir.
"""
import argparse
import datetime
import difflib
import importlib.metadata
import json
import math
import os
import platform
import random
import re
import resource
import signal
import socket
import sys
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager, nullcontext
from pathlib import Path

import huggingface_hub
import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps
from timm.data import Mixup, auto_augment, create_transform
from timm.data.loader import PrefetchLoader, fast_collate
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm, trunc_normal_
from timm.scheduler import CosineLRScheduler
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset

from common import DISTANCES, NORMS, PROJECTORS, FeatureDistiller, projector_cka, projector_spectrum

PROG = Path(__file__).stem
TEACHER_TOLERANCE = 1.0  # points (top-1; COCO: AP) a teacher may be off its published score before the run says so
FIXED_INPUT_SIZE = True  # every batch has --img-size: cuDNN may pick its fastest kernels once
STUDENTS = {"deit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
            "deit_small": dict(embed_dim=384, depth=12, num_heads=6)}
PUBLISHED_TOP1 = {"regnety_160.deit_in1k": 82.6}  # DeiT's teacher; a pretrained one far from this is wrong
DUMMY_TRAIN, DUMMY_VAL, DUMMY_CLASSES = 12_800, 256, 1000
# What makes a resumed run the same run: the data, the models, the distiller, the optimiser and its schedule (all
# but --epochs). The loss weights may change (a resume may re-weigh the objective), as may speed, logging and output
# flags. The world size is checked too.
RESUME_MUST_MATCH = ("dummy", "data_dir", "img_size", "student", "stem", "teacher", "distill", "projector",
                     "projector_hidden", "norm", "distance", "alpha", "batch_size", "lr", "min_lr", "warmup_lr",
                     "warmup_epochs", "wd", "max_steps")


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
    p.error = lambda message: fail(f"{message}; see --help")  # argparse's own errors, as one line too
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", type=Path, help="ImageFolder root holding train/<class>/*.JPEG and val/<class>/*.JPEG")
    g.add_argument("--dummy", action="store_true", help="random ImageNet-shaped images (1000 classes) instead of "
                   "--data-dir; the teacher is random unless --teacher-ckpt is given")
    g.add_argument("--img-size", type=int, default=224, help="training and evaluation crop (a multiple of 16)")
    g.add_argument("--crop-pct", type=float, default=0.875, help="evaluation: resize to img-size/crop-pct, center-crop")
    g.add_argument("--eval-interpolation", default="bilinear", choices=["bilinear", "bicubic"], help="evaluation "
                   "resize: bilinear as the official SRD code, bicubic as DeiT's")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm RandAugment policy ('none' to disable)")
    g.add_argument("--color-jitter", type=float, default=0.4, help="colour jitter; timm applies it only with --aa none")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--mixup", type=float, default=0.8, help="Mixup alpha (0 disables)")
    g.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha (0 disables)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g = p.add_argument_group("models")
    g.add_argument("--student", default="deit_tiny", choices=sorted(STUDENTS), help="student size")
    g.add_argument("--stem", default="conv", choices=["conv", "patch"], help="conv: the paper's convolutional "
                   "stem and conv token; patch: timm's deit_*_distilled_patch16_224 (distillation token)")
    g.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth of the student (the official "
                   "config names 0.1 but never applies it)")
    g.add_argument("--teacher", default="regnety_160.deit_in1k", help="a timm model name with its weight tag "
                   "(the bare regnety_160 is another, stronger model)")
    g.add_argument("--teacher-ckpt", type=Path, metavar="PATH", help="teacher weights (e.g. DeiT's "
                   "regnety_160-a5fe301d.pth); default: timm's pretrained weights for --teacher")
    g = p.add_argument_group("distillation")
    g.add_argument("--distill", default="srd", choices=["none", "kd", "srd"], help="none: cross-entropy on both "
                   "heads; kd: + KL on the second head; srd (Simple Recipe Distillation, the paper's): + the projector "
                   "feature loss")
    g.add_argument("--feat-weight", type=float, default=1.0, help="weight of the feature loss (the paper: unstated)")
    g.add_argument("--kd-weight", type=float, default=1.0, help="weight of the KL term (the paper: unstated)")
    g.add_argument("--temperature", type=float, default=1.0, help="KD temperature T")
    g.add_argument("--alpha", type=float, default=4.0, help="exponent of the distance")
    g.add_argument("--norm", default="bn", choices=NORMS, help="normalisation of z_s W_p and z_t, no affine: bn "
                   "(the paper's), gn (Table 6.1; eps 1e-4 where the official code's has 0: a departure), ln, l2; "
                   "none: no normalisation")
    g.add_argument("--projector", default="linear", choices=PROJECTORS, help="W_p: linear (the "
                   "paper's); mlp: Linear-BN-ReLU-Linear (our reading of the paper's 'MLP'); mlp-plain: "
                   "Linear-ReLU-Linear (the official code's); none: the identity")
    g.add_argument("--projector-hidden", type=int, help="hidden width of the 'mlp' projector (default: the "
                   "teacher's feature width)")
    g.add_argument("--distance", default="corr", choices=DISTANCES, help="corr: the released DeiT code's (the "
                   "paper does not name its DeiT distance); logsum: the paper's log sum |z_s W_p - z_t|^alpha; "
                   "mean: mean |d|^alpha (no log: Tables 6.3, 6.9; averaged over batch and dimensions where the paper "
                   "writes a squared norm: our reading); corr-nolog: the correlation form without the log")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=300, help="training epochs")
    g.add_argument("--max-steps", type=int, help="cap on the steps of each epoch (smoke tests, benchmarks)")
    g.add_argument("--batch-size", type=int, help="images per process (default: 512 // world size, the paper's "
                   "global batch; the official code's config: 256)")
    g.add_argument("--lr", type=float, default=5e-4, help="AdamW peak lr for a global batch of 512 (scaled linearly)")
    g.add_argument("--min-lr", type=float, default=5e-6, help="final cosine lr for a global batch of 512")
    g.add_argument("--warmup-lr", type=float, default=5e-7, help="initial warm-up lr for a global batch of 512")
    g.add_argument("--warmup-epochs", type=int, default=20, help="linear warm-up epochs")
    g.add_argument("--wd", type=float, default=0.05, help="weight decay (not on biases, norms, pos-embed, tokens)")
    g.add_argument("--clip-grad", type=float, default=15.0, help="gradient-norm clipping (0 disables)")
    g.add_argument("--clip-scaled", action="store_true", help="clip the GradScaler-scaled gradients as the official "
                   "code does under fp16; default: unscale, then clip")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    g.add_argument("--amp", choices=["off", "bf16", "fp16"], help="autocast dtype of training (default: bf16 on GPUs "
                   "that have it natively, else fp16; off on CPU); off is true float32; every evaluation is float32")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="NHWC memory layout, faster "
                   "convolutions on GPUs (default: on with CUDA, off on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the student with its distiller and the "
                   "teacher's forward; backward, the GradScaler and the optimizer step stay eager")
    g.add_argument("--sync-bn", action="store_true", help="synchronise the student's batch norms (the conv stem's) "
                   "across processes (CUDA); the distiller's see the global batch already")
    g.add_argument("--workers", type=int, help="data-loading processes per process (default: its cores, at most 8)")
    g.add_argument("--seed", type=int, default=0, help="random seed; every random draw depends on (seed, epoch, rank)")
    g.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    g = p.add_argument_group("outputs")
    g.add_argument("--out-dir", type=Path, help="output folder (default: the folder of --resume, else "
                   f"runs/{PROG}-<student>-<distill>, with -dummy for --dummy runs)")
    g.add_argument("--resume", metavar="auto|PATH", help="continue a run: auto, from the out-dir's last.pt if there is "
                   "one, else start (one command for the first launch and every restart); or a last.pt; flags not "
                   "given take the run's own values; with --evaluate, the weights to score (any format)")
    g.add_argument("--evaluate", action="store_true", help="evaluate the student of --resume (top-1, top-5, mu_T), "
                   "write eval.json, exit")
    g.add_argument("--mu-t", default="block", choices=("block", "cumulative"), help="mu_T's reading: block: the "
                   "thesis's Listing 2, each block on its own input; cumulative: the student up to each block, the "
                   "image rolled (our earlier reading)")
    args = parse_resuming(p, argv, resolve_defaults)  # a resume takes its run's flags for those not given
    for name in ("epochs", "batch_size", "log_every", "max_steps", "alpha", "temperature"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("lr", "wd", "min_lr", "warmup_lr", "warmup_epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if args.img_size % 16:
        fail(f"--img-size {args.img_size} is not a multiple of 16; the stems downsample by 16")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        fail(f"--batch-size {args.batch_size} is odd; Mixup/CutMix pair images, so pass an even batch size")
    if args.distill != "none" and not args.evaluate and not timm.is_model(args.teacher):
        close = difflib.get_close_matches(args.teacher, timm.list_models(pretrained=True), n=5)
        fail(f"unknown teacher {args.teacher!r}; choose a timm model (timm.list_models()), e.g. {', '.join(close)}")
    return args


def resolve_defaults(args):
    """The defaults that depend on other flags or on the machine, resolved once (args.json records them)."""
    cuda = args.device.startswith("cuda")
    if args.batch_size is None:
        args.batch_size = 512 // int(os.environ.get("WORLD_SIZE", 1))  # the paper's global batch
    if args.amp is None:  # bf16 where the GPU computes it natively; emulated (V100, T4) it is slower than fp16
        args.amp = ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16") if cuda else "off"
    if args.channels_last is None:
        args.channels_last = cuda
    if args.workers is None:
        args.workers = max(1, min(8, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    if args.out_dir is None:
        args.out_dir = Path(args.resume).parent if args.resume not in (None, "auto") else Path("runs") / (
            f"{PROG}-{args.student}-{args.distill}" + "-dummy" * args.dummy)
    return args


# ---- the method: the student with its distiller, the KD term, the schedule ----
class StudentWithDistiller(nn.Module):
    """The student and the feature distiller in one module, so that DDP keeps the projector identical on every rank:
    (x, z_t) -> (the logits, in training the pair of cls head and second head; the feature loss or None; z_s)."""

    def __init__(self, student, distiller, sync_bn=False):
        super().__init__()
        # --sync-bn syncs the student's batch norms alone, in place: the distiller's see the global batch already,
        # and a synced BN in an MLP projector would make the CKA that rank 0 takes at a log step a collective
        self.student = nn.SyncBatchNorm.convert_sync_batchnorm(student) if sync_bn else student
        self.distiller = distiller

    def forward(self, x, z_t=None):
        tokens = self.student.forward_features(x)
        logits = self.student.forward_head(tokens)
        z_s = tokens[:, self.student.num_prefix_tokens:].mean(1)  # mean of the patch-token outputs
        return logits, None if self.distiller is None else self.distiller(z_s, z_t), z_s


def kd_loss(logits_s, logits_t, T):
    """Hinton's KD term: KL(softmax(y_t / T) || softmax(y_s / T)), batch mean, times T^2 so that its gradients
    keep their scale as T changes."""
    return F.kl_div(F.log_softmax(logits_s.float() / T, 1), F.log_softmax(logits_t.float() / T, 1),
                    reduction="batchmean", log_target=True) * T * T


def build_distiller(args, student, teacher):
    """--distill srd's distiller: W_p from z_s's width to z_t's, then the flags' norm and distance; else None."""
    if args.distill != "srd":
        return None
    try:
        return FeatureDistiller(student.embed_dim, teacher.num_features, args.projector, args.norm, args.distance,
                                args.alpha, hidden=args.projector_hidden)
    except ValueError as e:  # e.g. --projector none with different widths
        fail(str(e))


def build_optimizer(model, student, args, scale):
    """DeiT's AdamW, its lr scaled with the global batch: weight decay on the weight matrices only."""
    no_decay = {f"student.{n}" for n in student.no_weight_decay()}  # position embedding, tokens
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n not in no_decay]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1 or n in no_decay]  # + biases and norms
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": rest, "weight_decay": 0.0}],
                             lr=args.lr * scale, betas=(0.9, 0.999), eps=1e-8)


def mixup_and_criterion(args, classes):
    """DeiT's Mixup/CutMix (None when both are off) and the cross-entropy of its soft labels, else label smoothing."""
    mixup = (Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                   num_classes=classes) if args.mixup > 0 or args.cutmix > 0 else None)
    return mixup, SoftTargetCrossEntropy() if mixup else LabelSmoothingCrossEntropy(args.smoothing)


def train_step(model, teacher, optimizer, scaler, autocast, args, x, y, criterion):
    """One step: CE on the cls head + kd_weight * KL on the second head + feat_weight * the feature loss, with the
    frozen teacher (x -> logits_t, z_t) under no_grad, the gradients clipped; returns the unweighted terms (ce, kd,
    feat) with the weighted total, and the student's features z_s, left on the device. An unused term is 0."""
    with autocast:
        logits_t = z_t = None
        if teacher is not None:
            with torch.no_grad():
                logits_t, z_t = teacher(x)
        (logits_s, logits_aux), loss_feat, z_s = model(x, z_t)  # the cls head; the conv-token (or dist.) head
        zero = torch.zeros((), device=x.device)
        if teacher is None:  # both heads learn the labels, as both vote at evaluation
            loss_ce, loss_kd = (criterion(logits_s, y) + criterion(logits_aux, y)) / 2, zero
        else:  # the labels on the cls head, the teacher on the second head
            loss_ce, loss_kd = criterion(logits_s, y), kd_loss(logits_aux, logits_t, args.temperature)
        loss_feat = zero if loss_feat is None else loss_feat
        loss = loss_ce + args.kd_weight * loss_kd + args.feat_weight * loss_feat
    scaler.scale(loss).backward()
    if args.clip_grad:
        if not args.clip_scaled:  # clip the true gradients; --clip-scaled: the scaled ones (official code)
            scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack([loss_ce, loss_kd, loss_feat, loss]).detach(), z_s.detach()


def build_scheduler(optimizer, args, steps, scale):
    """The official code's per-step schedule: the cosine's first warmup_epochs x steps replaced by a linear warm-up
    (no warmup_prefix: the cosine does not start at the end of the warm-up); the optimizer holds the scaled peak lr."""
    return CosineLRScheduler(optimizer, t_initial=args.epochs * steps, lr_min=args.min_lr * scale, t_in_epochs=False,
                             warmup_t=args.warmup_epochs * steps, warmup_lr_init=args.warmup_lr * scale)


def main(argv=None):
    args, t_start = parse_args(argv), time.time()  # flags that cannot be right are refused here

    # ---- set-up: one code path for one process and for torchrun ----
    device, rank, world, autocast = set_up(args)
    distributed, is_main, global_batch = dist.is_initialized(), rank == 0, args.batch_size * world
    scale = global_batch / 512  # DeiT's linear scaling rule, applied to every lr of the schedule
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    resumed, args_json = check_run(args, device, world)  # bad input: refused before anything is written
    if resumed is not None and args_json["resume"] == "auto" and resumed["epoch"] >= args.epochs:
        return finished(args, resumed["epoch"])  # the run is done: its summary, nothing changed

    # ---- data ----
    train_loader, val_loader, classes = build_data(args, device, rank, world)
    steps = min(len(train_loader), args.max_steps or len(train_loader))

    # ---- models: student, teacher, distiller ----
    student = build_student(args, classes)
    if resumed is not None:
        load_weights(student, resumed, args.resume, "student")
    if args.evaluate:
        return evaluate_checkpoint(args, student, val_loader, device, memory_format)
    teacher = build_teacher(args, classes)
    teach = teacher_outputs(teacher)  # teach(x) -> (logits_t, z_t)
    distiller = build_distiller(args, student, teacher)
    model = StudentWithDistiller(student, distiller, sync_bn=args.sync_bn and distributed)
    model.to(device, memory_format=memory_format)
    if teacher is not None:
        teacher.to(device, memory_format=memory_format)

    # ---- optimisation ----
    optimizer = build_optimizer(model, student, args, scale)  # AdamW; no weight decay on biases, norms and tokens
    scheduler = build_scheduler(optimizer, args, steps, scale)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    mixup, criterion = mixup_and_criterion(args, classes)  # Mixup/CutMix and the soft-target CE of their labels
    if args.compile:
        model, teach = torch.compile(model), torch.compile(teach) if teach is not None else None
    if distributed:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- resume ----
    start_epoch, best, best_epoch = load_state(resumed, distiller, optimizer, scheduler, scaler, steps)
    if is_main:  # the run writes from here on
        open_outputs(args.out_dir, args_json, start_epoch)
        print(f"args: {json.dumps(args_json)}\nworld size {world} | device {device} | amp {args.amp} | global batch "
              f"{global_batch}{'' if global_batch == 512 else ' (the paper: 512)'} | lr {args.lr * scale:.4g} | "
              f"{steps} steps/epoch | params: student {n_params(student):.2f}m, distiller {n_params(distiller):.2f}m, "
              f"teacher {n_params(teacher):.2f}m")
        if resumed is not None:
            print(f"resuming {args.resume}: {start_epoch} epochs done, best top1 {best:.2f} (epoch {best_epoch})")
    teacher_top1 = score_teacher(args, teacher, classes, val_loader, device, memory_format)

    # ---- training ----
    term_names, run_time = ["ce"] + ["kd"] * (teacher is not None) + ["feat"] * (distiller is not None), 0.0
    for epoch in range(start_epoch, args.epochs):
        seed_everything(seed_of(args.seed, epoch, rank), train_loader)  # resuming continues exactly
        train_loader.sampler.set_epoch(epoch)
        model.train()
        reset_peak_memory(device)  # the record's peak is this epoch's training
        epoch_sums = torch.zeros(4, device=device)  # ce, kd, feat and the weighted total, summed over the epoch
        logged_sums, logged, t_log, data_time = torch.zeros(4, device=device), 0, time.time(), 0.0
        cka = []  # [global step, CKA of z_s and its projection] at each log step: Figure 6.3
        t_epoch = t_data = time.time()
        for step, (x, y) in enumerate(train_loader):
            if step == steps:
                break
            data_time += time.time() - t_data
            x = x.contiguous(memory_format=memory_format)  # on the device, normalised (and erased) by the loader
            if mixup:
                x, y = mixup(x, y)
            terms, z_s = train_step(model, teach, optimizer, scaler, autocast, args, x, y, criterion)
            scheduler.step_update(epoch * steps + step)  # as the official loop: the next step runs at this one's t
            epoch_sums += terms.float()
            if (step + 1) % args.log_every == 0 or step + 1 == steps:  # the only host-device syncs
                total = epoch_sums.clone()
                if distributed:
                    dist.all_reduce(total)
                    total /= world
                means = ((total - logged_sums) / (step + 1 - logged)).tolist()
                losses = dict(zip(("ce", "kd", "feat", "total"), means))
                stop_if_not_finite({n: losses[n] for n in term_names + ["total"]}, epoch, step)  # on every rank
                now, done = time.time(), (epoch - start_epoch) * steps + step + 1
                if is_main:
                    log_line(epoch, args.epochs, step, steps, " ".join(f"{n} {losses[n]:.3f}" for n in term_names),
                             optimizer.param_groups[0]["lr"], (step + 1 - logged) * global_batch / (now - t_log),
                             data_time / (step + 1 - logged),
                             (run_time + now - t_epoch) / done * ((args.epochs - start_epoch) * steps - done))
                    if distiller is not None:
                        cka.append([epoch * steps + step + 1, projector_cka(distiller, z_s).item()])
                t_log, data_time, logged, logged_sums = now, 0.0, step + 1, total
            t_data = time.time()
        epoch_s, peak_mb = time.time() - t_epoch, peak_memory_mb(device)  # the peak before scoring: training's
        run_time += epoch_s

        # ---- the epoch's score, checkpoint and record ----
        broadcast_buffers(student)  # the conv stem's BN statistics: every rank scores the model rank 0 saves
        metrics = evaluate(student, val_loader, device, memory_format)
        if metrics["top1"] > best:
            best, best_epoch = metrics["top1"], epoch + 1
        if is_main:
            sv = projector_spectrum(distiller) if distiller is not None else None
            record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **{  # the last log closes the epoch
                      f"loss_{n}": v / steps if n in term_names else None for n, v in zip(("ce", "kd", "feat"),
                      logged_sums.tolist())}, "top1": metrics["top1"], "top5": metrics["top5"],
                      "images_per_s": steps * global_batch / epoch_s, "epoch_s": epoch_s,
                      "peak_mem_mb": peak_mb, "projector_sv": None if sv is None else sv.tolist(),
                      "projector_cka": cka if distiller is not None else None}  # W_p's spectrum: Figure 6.2
            write_epoch(args.out_dir, training_state(student, distiller, optimizer, scheduler, scaler, epoch + 1, best,
                                                     best_epoch, args_json), record)
            print(f"epoch {epoch + 1}/{args.epochs} | top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f} | best "
                  f"{best:.2f} (epoch {best_epoch}) | {epoch_s:.0f} s | peak {record['peak_mem_mb']:.0f} MB",
                  flush=True)

    # ---- summary ----
    summary = write_summary(args, metrics, best, best_epoch, teacher_top1, t_start, (args.epochs - start_epoch)
                            * steps * global_batch / run_time, world) if is_main else None
    if distributed:
        dist.destroy_process_group()
    return summary


# ==== Appendix: the plumbing a reader of the method can skip (data, model zoo, teacher weights, checkpoints) ====
# ---- data: ImageFolder ImageNet through timm's DeiT augmentation, or random images of the same shape ----
def posterize(img, bits_to_keep, **_):
    """RandAugment's posterize, accepting 0 bits ('inc1' asks for 0 when the magnitude clips at 10): a black image,
    as older Pillow returned and DeiT trained with; current Pillow raises, which would stop the run mid-epoch."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return img if bits_to_keep >= 8 else ImageOps.posterize(img, bits_to_keep)


auto_augment.NAME_TO_OP.update(dict.fromkeys(("Posterize", "PosterizeIncreasing", "PosterizeOriginal"), posterize))


def build_data(args, device, rank, world):
    """The training loader (this rank's shard, whole batches only: every rank gives the distiller as many rows),
    the evaluation loader (every world-th image: the whole set, each image once) and the number of classes. Workers
    send uint8 images (a quarter of float32's bytes through shared memory and to the GPU); timm's PrefetchLoader
    normalises them on the device and applies DeiT's random erasing there."""
    train_tf = create_transform(args.img_size, is_training=True, color_jitter=args.color_jitter,
                                auto_augment=None if args.aa == "none" else args.aa, interpolation="bicubic",
                                use_prefetcher=True)
    val_tf = create_transform(args.img_size, interpolation=args.eval_interpolation, crop_pct=args.crop_pct,
                              use_prefetcher=True)
    sets, classes, size = {}, DUMMY_CLASSES, int(args.img_size / args.crop_pct)
    layout = ("expected ImageFolder ImageNet: DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG with the same "
              "class folders (the val images sorted into folders, e.g. with the standard valprep.sh)")
    if args.data_dir is None and not args.dummy:
        fail(f"pass --data-dir DIR ({layout}) or --dummy")
    for split, tf, n in (("train", train_tf, DUMMY_TRAIN), ("val", val_tf, DUMMY_VAL)):
        try:
            sets[split] = (torchvision.datasets.FakeData(n, (3, size, size), classes, tf) if args.dummy else
                           torchvision.datasets.ImageFolder(str(args.data_dir / split), transform=tf))
        except (FileNotFoundError, OSError) as e:
            fail(f"--data-dir {args.data_dir}: cannot read {split}/ ({str(e).splitlines()[0]}); {layout}")
    if not args.dummy:
        if sets["train"].classes != sets["val"].classes:
            fail(f"--data-dir {args.data_dir}: train/ and val/ have different class folders; {layout}")
        classes = len(sets["train"].classes)
    sampler = DistributedSampler(sets["train"], num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    kw = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda",
              collate_fn=fast_collate)
    train_loader = PrefetchLoader(DataLoader(sets["train"], sampler=sampler, drop_last=True,
                                             generator=torch.Generator(), **kw),
                                  device=device, re_prob=args.reprob, re_mode="pixel", re_count=1)
    val_loader = PrefetchLoader(DataLoader(Subset(sets["val"], range(rank, len(sets["val"]), world)), **kw),
                                device=device)
    if len(train_loader) == 0 and not args.evaluate:
        fail(f"{len(train_loader.dataset)} training images are fewer than one global batch of "
             f"{args.batch_size * world}; lower --batch-size")
    return train_loader, val_loader, classes


def seed_everything(seed, train_loader):
    """Every random draw of an epoch from one seed, of (seed, epoch, rank): a resume repeats the epochs it missed."""
    random.seed(seed)
    np.random.seed(seed)  # Mixup / CutMix
    torch.manual_seed(seed)  # augmentation with --workers 0, random erasing, drop path
    train_loader.loader.generator.manual_seed(seed)  # the workers' seeds


# ---- models: DeiT with the paper's convolutional stem; any timm teacher ----
class ConvStem(nn.Module):
    """The paper's stem: the same 16x downsampling to tokens as the 16x16 patch embedding it replaces."""

    def __init__(self, img_size=224, in_chans=3, embed_dim=192, **_):  # timm passes patch-embed arguments too
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        self.proj = nn.Conv2d(64, embed_dim, kernel_size=8, stride=8)
        self.grid_size = (img_size // 16, img_size // 16)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def init_weights(self):  # called by timm's ViT initialisation; He-normal as in the official code
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        return self.proj(self.conv(x)).flatten(2).transpose(1, 2)  # (B, N, C) patch embeddings


class ConvStemDeiT(VisionTransformer):
    """DeiT on ``[cls, conv token, patch tokens]``: training returns the logits of ``head`` (on cls; CE) and of
    ``head_conv`` (on the conv token; the teacher's KL), evaluation their average, like timm's distilled DeiT."""

    def __init__(self, **kwargs):
        super().__init__(embed_layer=ConvStem, **kwargs)
        self.num_prefix_tokens = 2
        self.pos_embed = nn.Parameter(trunc_normal_(torch.empty(1, self.patch_embed.num_patches + 2,
                                                                self.embed_dim), std=0.02))
        self.head_conv = nn.Linear(self.embed_dim, self.num_classes)
        init_weights_vit_timm(self.head_conv)

    def _pos_embed(self, x):
        conv_token = x.mean(1, keepdim=True)  # the mean of the patch embeddings
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), conv_token, x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_head(self, x, pre_logits=False):
        x, x_conv = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return (x + x_conv) / 2
        y, y_conv = self.head(x), self.head_conv(x_conv)
        return (y, y_conv) if self.training else (y + y_conv) / 2


def build_student(args, classes):
    if args.stem == "patch":
        student = timm.create_model(f"{args.student}_distilled_patch16_224", num_classes=classes,
                                    img_size=args.img_size, drop_path_rate=args.drop_path)
        student.set_distilled_training(True)  # training returns (cls logits, distillation-token logits)
        return student
    return ConvStemDeiT(img_size=args.img_size, num_classes=classes, drop_path_rate=args.drop_path,
                        **STUDENTS[args.student])


def build_teacher(args, classes):
    """The frozen teacher in eval mode: --teacher-ckpt, timm's published weights, or random under --dummy."""
    if args.distill == "none":
        return None
    teacher = (timm.create_model(args.teacher, num_classes=classes) if args.teacher_ckpt or args.dummy
               else pretrained(args.teacher))
    if args.teacher_ckpt:
        load_weights(teacher, read_checkpoint(args.teacher_ckpt), args.teacher_ckpt, "teacher")
    if teacher.num_classes != classes:
        fail(f"teacher {args.teacher} has {teacher.num_classes} classes but the data has {classes}; "
             "pass a --teacher-ckpt trained on these classes")
    return teacher.requires_grad_(False).eval()


def teacher_outputs(teacher):
    """teach(x) -> (the teacher's logits, z_t: its pooled feature, 3024-d for RegNetY-160); None without one."""
    if teacher is None:
        return None

    def teach(x):
        features = teacher.forward_features(x)
        return teacher.forward_head(features), teacher.forward_head(features, pre_logits=True)
    return teach


def pretrained(name):
    """timm's published weights, from the cache or downloaded. Offline, the hub's client retries for about 50 s
    before it gives up: one connection attempt decides instead, and an unreachable hub means the cache only."""
    hub, offline = huggingface_hub.constants, huggingface_hub.constants.HF_HUB_OFFLINE
    url = urllib.parse.urlsplit(hub.ENDPOINT)
    try:
        if not offline and not urllib.request.getproxies():  # behind a proxy the download goes through it
            socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError:
        hub.HF_HUB_OFFLINE = True
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as e:  # offline and not cached, or a name without pretrained weights
        reason = (str(e).strip().splitlines() or [""])[0][:120]
        fail(f"no pretrained weights for teacher {name} ({type(e).__name__}: {reason}); pass --teacher-ckpt PATH "
             "(DeiT's regnety_160-a5fe301d.pth) or allow the download")
    finally:
        hub.HF_HUB_OFFLINE = offline


# ---- evaluation: exact top-1/top-5 over the whole validation set, shards all-reduced; mu_T ----
@torch.no_grad()
def evaluate(model, loader, device, memory_format):
    """Top-1/top-5 in float32 whatever --amp trains in (no autocast, no TF32): a score must not depend on the speed
    flags. The images are counted on the host."""
    was_training = model.training
    model.eval()
    hits, n = torch.zeros(2, device=device, dtype=torch.float64), 0  # top-1 and top-5 hits, images
    with float32_scores():
        for x, y in loader:
            n += len(y)
            logits = model(x.contiguous(memory_format=memory_format))
            correct = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
            hits += torch.stack([correct[:, 0].sum(), correct.any(1).sum()])
    counts = torch.cat([hits, hits.new_tensor([n])])
    if dist.is_initialized():
        dist.all_reduce(counts)
    model.train(was_training)
    return {"top1": 100 * counts[0].item() / counts[2].item(), "top5": 100 * counts[1].item() / counts[2].item(),
            "images": int(counts[2].item())}


def shift_patches(patches):
    """T of the thesis's Listing 2 on a ``(B, h, w, C)`` patch grid: one patch to the right, the first column filled
    with zeros. It must not wrap: a block is permutation-equivariant, so under a circular roll every mu_T is 0."""
    return F.pad(patches[:, :, :-1], (0, 0, 1, 0))


def block_mu_t(block, tokens, prefix, grid):
    """Listing 2 for one block: ``(block(T x) - T block(x))^2`` on the patch tokens, averaged over channels, per image
    and position ``(B, h, w)``; x = the block's input tokens ``(B, prefix + h*w, C)``, whose ``prefix`` tokens (cls,
    conv or distillation) enter the block unmoved and are not compared."""
    def patches(t):
        return t[:, prefix:].unflatten(1, grid)
    moved = torch.cat([tokens[:, :prefix], shift_patches(patches(tokens)).flatten(1, 2)], 1)
    return (patches(block(moved)) - shift_patches(patches(block(tokens)))).float().pow(2).mean(-1)


@torch.no_grad()
def translation_equivariance(student, loader, device, memory_format, reading="block"):
    """The paper's mu_T(phi) = ||phi(Tx) - T phi(x)||^2 (thesis Table 6.7), one value per transformer block (the
    paper's mean +- std is over the blocks), averaged in float64 over every image of ``loader``.

    ``block`` (the thesis's Listing 2): phi = the block alone, on the tokens the student gives it, T =
    ``shift_patches``. The filled first column is not counted (T leaves nothing there to compare: our reading), so
    a per-token map scores exactly 0 and what is measured is the attention's use of position.
    ``cumulative`` (our earlier reading, kept for comparison): phi = the student up to the block, T = a circular roll
    of the image by one patch down and right and of the patch grid by one row and column; it measures the position
    embedding and the stem's borders as well."""
    was_training = student.training
    student.eval()
    grid, prefix = student.patch_embed.grid_size, student.num_prefix_tokens
    sums, count = torch.zeros(len(student.blocks), device=device, dtype=torch.float64), torch.zeros((), device=device)

    def blocks(x):  # each block with its input and output tokens
        tokens = student.norm_pre(student.patch_drop(student._pos_embed(student.patch_embed(x))))
        for block in student.blocks:
            out = block(tokens)
            yield block, tokens, out
            tokens = out

    with float32_scores():
        for x, _ in loader:
            x = x.contiguous(memory_format=memory_format)
            if reading == "block":
                for i, (block, tokens, _) in enumerate(blocks(x)):
                    sums[i] += block_mu_t(block, tokens, prefix, grid)[:, :, 1:].double().mean((1, 2)).sum()
            else:
                shift = (x.shape[-2] // grid[0], x.shape[-1] // grid[1])
                for i, ((*_, plain), (*_, moved)) in enumerate(zip(blocks(x), blocks(x.roll(shift, dims=(-2, -1))))):
                    plain, moved = (t[:, prefix:].unflatten(1, grid) for t in (plain, moved))
                    sums[i] += (moved - plain.roll((1, 1), dims=(1, 2))).double().pow(2).mean((1, 2, 3)).sum()
            count += len(x)
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(count)
    student.train(was_training)
    return (sums / count).tolist()


# ---- the run's bookkeeping: this task's ----
def evaluate_checkpoint(args, student, val_loader, device, memory_format):
    """--evaluate: top-1/top-5 and mu_T per block (thesis Table 6.7) of the --resume student, printed, in eval.json."""
    student.to(device, memory_format=memory_format)
    record = evaluate(student, val_loader, device, memory_format)
    mu_t = torch.tensor(translation_equivariance(student, val_loader, device, memory_format, args.mu_t))
    record |= {"checkpoint": str(args.resume), "mu_t": mu_t.tolist(), "mu_t_mean": mu_t.mean().item(),
               "mu_t_std": mu_t.std(unbiased=False).item(), "mu_t_reading": args.mu_t}
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"{args.resume}: top1 {record['top1']:.2f} top5 {record['top5']:.2f} on {record['images']} images "
              f"| mu_T ({args.mu_t}) {record['mu_t_mean']:.3g} +- {record['mu_t_std']:.3g} over {len(mu_t)} blocks "
              "(thesis Table 6.7, DeiT-S: DeiT 1.52 +- 0.15, CivT 0.13 +- 0.05, SRD 0.04 +- 0.02)")
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        save_atomic(json.dumps(record, indent=2) + "\n", Path(args.out_dir) / "eval.json")
    if dist.is_initialized():
        dist.destroy_process_group()
    return record


def load_state(resumed, distiller, optimizer, scheduler, scaler, steps):
    """(epochs done, best top-1, its epoch): a new run's, or those of the --resume checkpoint, whose distiller,
    optimizer and scaler states are loaded (its student already is)."""
    if resumed is None:
        return 0, -1.0, -1
    if distiller is not None:
        distiller.load_state_dict(resumed["distiller"])
    optimizer.load_state_dict(resumed["optimizer"])
    if resumed["scaler"]:  # a bf16 or float32 run saved a disabled scaler's {}: resuming it in fp16 starts afresh
        scaler.load_state_dict(resumed["scaler"])
    # The schedule is this run's flags' (--epochs may differ from the checkpoint's), at the lr the loop sets after
    # the last step done; the scheduler's saved state is not loaded.
    scheduler.step_update(resumed["epoch"] * steps - 1)
    return resumed["epoch"], resumed["best"], resumed.get("best_epoch", -1)


def score_teacher(args, teacher, classes, val_loader, device, memory_format):
    """The teacher's validation top-1, printed (and warned about if far from its published one); None without one."""
    if teacher is None:
        return None
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    if args.dummy and not args.teacher_ckpt and is_main:
        print(f"teacher {args.teacher} is randomly initialised (--dummy without --teacher-ckpt)")
    metrics = evaluate(teacher, val_loader, device, memory_format)
    if is_main:
        print(f"teacher {args.teacher}: top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f} on {metrics['images']} "
              "images")
        published = PUBLISHED_TOP1.get(args.teacher)
        if published and not args.dummy and classes == 1000 and abs(metrics["top1"] - published) > TEACHER_TOLERANCE:
            print(f"warning: teacher {args.teacher} scores {metrics['top1']:.2f}% top-1, far from its published "
                  f"{published}%: check --teacher-ckpt and the validation data")
    return metrics["top1"]


def write_summary(args, metrics, best, best_epoch, teacher_top1, t_start, images_per_s, world):
    """summary.json, the run in one record (returned, and what main returns), and the last line."""
    summary = {"metric": "top1", "best": best, "best_epoch": best_epoch, "last": metrics["top1"],
               "last_top5": metrics["top5"], "teacher": teacher_top1, "student_arch": args.student, "stem": args.stem,
               "teacher_arch": args.teacher if teacher_top1 is not None else None, "distill": args.distill,
               "wall_s": time.time() - t_start, "images_per_s": images_per_s,
               "peak_mem_mb": run_peak_mb(args.out_dir), "world_size": world, "versions": versions()}
    save_atomic(json.dumps(summary, indent=2) + "\n", Path(args.out_dir) / "summary.json")
    print(f"done: best top1 {best:.2f} (epoch {best_epoch}), last top1 {metrics['top1']:.2f} | "
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
