"""CIFAR-100 knowledge distillation with the recipe of "Understanding the Role of the Projector in Knowledge
Distillation" (Miles & Mikolajczyk, AAAI 2024), under the RepDistiller/mdistiller protocol.

The paper's numbers, standard protocol with the published teachers (AAAI-24 poster, Table 3), top-1 %:
resnet32x4 -> resnet8x4 76.55 (teacher 79.42, student alone 72.50, KD 73.33, CRD 75.51, DKD 76.32);
ResNet50 -> MobileNetV2 71.53 (teacher 79.34, student alone 64.60, CRD 69.11, DKD 70.35). The thesis' Table 6.4
uses SSKD's teachers and trains on pairs of augmented images, which this script does not reproduce.

    python cifar100_kd.py     # resnet32x4 -> resnet8x4, the paper's 76.55: CIFAR-100 and the teacher are downloaded
    python cifar100_kd.py --teacher ResNet50 --student MobileNetV2       # the paper's 71.53 (lr 0.01 by default)
    python cifar100_kd.py --projector linear --kd-weight 1   # the official ImageNet code's recipe: linear W_p + KL, T=1
    python cifar100_kd.py --student resnet20 --distill none              # train your own teacher, then:
    python cifar100_kd.py --teacher resnet20 --teacher-ckpt runs/cifar100_kd-resnet20-none/best.pt --student resnet8
    torchrun --nproc_per_node=2 cifar100_kd.py --batch-size 32           # the same global batch on 2 GPUs
    python cifar100_kd.py --dummy --epochs 1 --max-steps 20   # no data, random teacher: a smoke test

The loss: cross-entropy plus 2 x the paper's feature loss on the pooled penultimate features, batch norm without
affine on the projected student feature ``z_s W_p`` and on the teacher's ``z_t``, then the soft maximum
``log sum |norm(z_s W_p) - norm(z_t)| ** alpha``, alpha = 4. The projector is the paper's for CIFAR-100, an MLP with
1024 hidden units, with no KL term (thesis Sec. 6.4.1); the weight 2 is the official code's (the paper states none).
The protocol is CRD's: 22 architectures, 240 epochs of SGD (batch 64, lr 0.05, or 0.01 for MobileNetV2/ShuffleNets,
x0.1 at epochs 150/180/210, weight decay 5e-4), 4-pixel padded crops and flips, done per batch on the device where
the uint8 data set lives (no DataLoader). The models load RepDistiller's published teachers (mdistiller's
``cifar_teachers.tar``, fetched once into torch's hub cache) and our checkpoints load into their code
(``torch.load(path)["model"]``). A run prints the teacher's test accuracy (79.42 for resnet32x4; a fetched teacher
a point off stops it), a line per ``--log-every`` steps and a float32 score per epoch on the 10,000 test images,
and writes args.json, metrics.jsonl, last.pt, best.pt and summary.json to ``--out-dir``.
"""
import argparse
import datetime
import importlib.metadata
import io
import json
import math
import os
import pickle
import platform
import re
import resource
import shutil
import signal
import sys
import tarfile
import time
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from common import DISTANCES, NORMS, PROJECTORS, FeatureDistiller, projector_cka, projector_spectrum

PROG = Path(__file__).stem
TEACHER_TOLERANCE = 1.0  # points (top-1; COCO: AP) a teacher may be off its published score before the run says so
FIXED_INPUT_SIZE = True  # every batch is 32 x 32: cuDNN may pick its fastest kernels once
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
LAYOUT = "<data-dir>/cifar-100-python/{train,test}, the pickles of the python release"
MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
NUM_CLASSES = 100
DUMMY_SIZES = (50_000, 1_000)  # --dummy: an epoch (782 steps of 64) for benchmarks, a small test set for smoke tests
# What makes a resumed run the same run: the data, the models, the distiller, the optimiser and its schedule (all
# but --epochs). The loss weights may change (a resume may re-weigh the objective), as may speed, logging and output
# flags. The world size is checked too.
RESUME_MUST_MATCH = ("dummy", "data_dir", "student", "teacher", "distill", "projector", "projector_hidden", "norm",
                     "distance", "alpha", "batch_size", "lr", "lr_milestones", "lr_gamma", "momentum", "wd")
# RepDistiller's teachers, as mdistiller's `checkpoints` release redistributes them, with their test top-1 in CRD's
# Tables 1-2: what a fetched teacher must score where its checkpoint records none (a --teacher-ckpt far below warns).
TEACHERS_URL = "https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"
PUBLISHED_TOP1 = {"resnet56": 72.34, "resnet110": 74.31, "resnet32x4": 79.42, "ResNet50": 79.34, "wrn_40_2": 75.61,
                  "vgg13": 74.64}


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
    p.error = lambda message: fail(f"{message}; see --help")  # one line on stderr, exit 2, as all bad input
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="data/cifar100",
                   help=f"dataset root, laid out as {LAYOUT}; the release is downloaded there when missing")
    g.add_argument("--dummy", action="store_true", help=f"random images ({DUMMY_SIZES[0]} train, {DUMMY_SIZES[1]} "
                   "test) and teacher (unless --teacher-ckpt or --teacher-url): no files or downloads; a benchmark")
    g = p.add_argument_group("models")
    g.add_argument("--student", default="resnet8x4", choices=ARCHS, metavar="ARCH",
                   help=f"student architecture, one of: {', '.join(ARCHS)}")
    g.add_argument("--teacher", default="resnet32x4", choices=ARCHS, metavar="ARCH", help="teacher architecture")
    g.add_argument("--teacher-ckpt", metavar="PATH", help="teacher weights, a best.pt of this script or RepDistiller's "
                   "ckpt_epoch_240.pth (default: the published teacher of --teacher, fetched from --teacher-url)")
    g.add_argument("--teacher-url", metavar="URL", help=f"the published teachers' tar ({', '.join(PUBLISHED_TOP1)}), "
                   f"cached in $TORCH_HOME (default: {TEACHERS_URL}); a mirror or file:// URL; --dummy fetches if set")
    g = p.add_argument_group("distillation")
    g.add_argument("--distill", default="srd", choices=("none", "kd", "srd"), help="none: cross-entropy only (a "
                   "baseline, or a teacher); kd: CE + KL; srd (Simple Recipe Distillation, the paper's): CE + the "
                   "feature loss + KL if --kd-weight>0")
    g.add_argument("--ce-weight", type=float, default=1.0, help="weight of the cross-entropy (classic KD: 0.1)")
    g.add_argument("--kd-weight", type=float,
                   help="weight of the KL term (default: 0 for srd, the paper's CIFAR-100 setting; 1 for kd)")
    g.add_argument("--temperature", type=float, default=1.0, help="KD temperature T (classic KD: 4)")
    g.add_argument("--feat-weight", type=float, default=2.0, help="weight of the feature loss (srd); the paper "
                   "does not state it: the official code's")
    g.add_argument("--alpha", type=float, default=4.0, help="exponent of the soft maximum log sum |d|^alpha")
    g.add_argument("--norm", default="bn", choices=NORMS, help="normalisation of z_s W_p and z_t, no affine: bn (the "
                   "paper's), gn (Table 6.1; eps 1e-4 where the official code's has 0: a departure), ln, l2; none: no "
                   "normalisation")
    g.add_argument("--projector", default="mlp", choices=PROJECTORS, help="W_p: linear (the paper's on ImageNet); "
                   "mlp (the paper's here): Linear-BN-ReLU-Linear, our reading of 'MLP', its BN keeps the hidden "
                   "layer from collapsing; mlp-plain: Linear-ReLU-Linear (the official code's); none: the identity")
    g.add_argument("--projector-hidden", type=int, default=1024,
                   help="hidden width of the 'mlp' projector (the paper's CIFAR-100 runs: 1024)")
    g.add_argument("--distance", default="logsum", choices=DISTANCES, help="logsum: the paper's log sum "
                   "|d|^alpha; corr: the official DeiT code's correlation form; "
                   "mean: mean |d|^alpha (no log: Tables 6.3, 6.9; averaged over batch and dimensions where the paper "
                   "writes a squared norm: our reading); corr-nolog: the correlation form without the log")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=240, help="training epochs")
    g.add_argument("--max-steps", type=int, help="cap on the steps of each epoch (smoke tests, benchmarks)")
    g.add_argument("--batch-size", type=int, default=64, help="images per process and step")
    g.add_argument("--lr", type=float, help="SGD learning rate for a global batch of 64, scaled linearly with the "
                   "global batch (default 0.05; 0.01 for MobileNetV2, ShuffleV1 and ShuffleV2)")
    g.add_argument("--lr-milestones", type=int, nargs="+", default=[150, 180, 210], help="epochs of the step decay")
    g.add_argument("--lr-gamma", type=float, default=0.1, help="the lr's factor at each milestone")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--wd", type=float, default=5e-4, help="weight decay of the student and the projector")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    g.add_argument("--amp", choices=("off", "bf16", "fp16"), help="mixed precision (default: bf16 on GPUs that have "
                   "it natively, else fp16; off on CPU); off is true float32, and every score is float32")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="NHWC memory layout, faster convolutions on GPUs (default: on with CUDA, off on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the training step (CUDA graphs on one GPU): "
                   "teacher, student, distiller and losses as one graph with its backward, the SGD update as another; "
                   "the graph breaks at GradScaler, which torch does not trace, so backward() is called eagerly")
    g.add_argument("--sync-bn", action="store_true", help="the student's batch-norm statistics over the global batch "
                   "under torchrun (CUDA); the distiller's see the global batch already")
    g.add_argument("--seed", type=int, default=0, help="random seed; every random draw depends on (seed, epoch, rank)")
    g.add_argument("--log-every", type=int, default=100, help="steps between log lines (the only host-device syncs)")
    g = p.add_argument_group("outputs")
    g.add_argument("--out-dir", help=f"output folder (default: the folder of --resume, else "
                   f"runs/{PROG}-<student>-<distill>, with -dummy for --dummy runs)")
    g.add_argument("--resume", metavar="auto|PATH", help="continue a run: auto, from the out-dir's last.pt if there is "
                   "one, else start (one command for the first launch and every restart); or a last.pt; flags not "
                   "given take the run's own values; with --evaluate, the weights to score (any format)")
    g.add_argument("--evaluate", action="store_true", help="score the student of --resume, write eval.json and exit")
    args = parse_resuming(p, argv, resolve_defaults)  # a resume takes its run's flags for those not given
    for name in ("epochs", "batch_size", "log_every", "max_steps", "alpha", "temperature"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("lr", "wd"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if args.batch_size < 2:
        fail(f"--batch-size must be at least 2 (batch norm needs two images per process), got {args.batch_size}")
    fetches = args.distill != "none" and not args.evaluate and not args.teacher_ckpt and (
        args.teacher_url or not args.dummy)
    if fetches and args.teacher not in PUBLISHED_TOP1:
        fail(f"--teacher {args.teacher} has no published weights (the release holds {', '.join(PUBLISHED_TOP1)}); "
             f"train it (--student {args.teacher} --distill none), then --teacher-ckpt {args.teacher}'s best.pt")
    return args


def resolve_defaults(args):
    """The defaults that depend on other flags or on the machine, resolved once (args.json records them)."""
    cuda = args.device.startswith("cuda")
    if args.amp is None:  # bf16 where the GPU computes it natively; emulated (V100, T4) it is slower than fp16
        args.amp = ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16") if cuda else "off"
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    if args.kd_weight is None:  # the paper's CIFAR-100 distiller has no KL term; --distill kd is CE + KL
        args.kd_weight = 0.0 if args.distill == "srd" else 1.0
    args.lr = (0.01 if args.student in SMALL_LR_ARCHS else 0.05) if args.lr is None else args.lr
    if args.out_dir is None:  # --dummy runs have their own folder: a real run's never holds random-data checkpoints
        args.out_dir = (str(Path(args.resume).parent) if args.resume not in (None, "auto") else
                        f"runs/{PROG}-{args.student}-{args.distill}" + ("-dummy" if args.dummy else ""))
    return args


# ---- the method: the student and the paper's distiller in one module, so that DDP keeps the projector W_p identical
# on every rank (and averages its gradients like the student's), and Hinton's KD term.
class StudentWithDistiller(nn.Module):
    def __init__(self, student, distiller, sync_bn=False):
        super().__init__()
        # --sync-bn syncs the student's batch norms alone, in place: the distiller's see the global batch already,
        # and a synced BN in the MLP projector would make the CKA that rank 0 takes at a log step a collective
        self.student = nn.SyncBatchNorm.convert_sync_batchnorm(student) if sync_bn else student
        self.distiller = distiller

    def forward(self, x, z_t=None):
        logits, z_s = self.student(x)
        return logits, self.distiller(z_s, z_t) if self.distiller is not None else None, z_s


def kd_loss(logits_s, logits_t, T):
    """Hinton's KD term: KL(softmax(y_t / T) || softmax(y_s / T)), batch mean, times T^2 so that its gradients
    keep their scale as T changes."""
    return F.kl_div(F.log_softmax(logits_s.float() / T, 1), F.log_softmax(logits_t.float() / T, 1),
                    reduction="batchmean", log_target=True) * T * T


def build_distiller(args, student, teacher):
    """--distill srd's distiller (else None): W_p maps z_s to the teacher's width, then --norm and --distance."""
    if args.distill != "srd":
        return None
    try:
        return FeatureDistiller(student.feat_dim, teacher.feat_dim, args.projector, args.norm, args.distance,
                                args.alpha, hidden=args.projector_hidden)
    except ValueError as e:  # e.g. --projector none with different widths
        fail(str(e))


def train_step(model, teacher, optimizer, scaler, autocast, args, x, y):
    """One step of the paper's objective, CE + kd_weight * KL + feat_weight * the feature loss, the frozen teacher
    under no_grad; returns the unweighted terms (ce, kd, feat; 0 where unused) and z_s, left on the device."""
    with autocast:
        logits_t = z_t = None
        if teacher is not None:
            with torch.no_grad():
                logits_t, z_t = teacher(x)
        logits_s, loss_feat, z_s = model(x, z_t)
        loss_ce = F.cross_entropy(logits_s.float(), y)
        zero = torch.zeros((), device=x.device)
        loss_kd = kd_loss(logits_s, logits_t, args.temperature) if teacher is not None and args.kd_weight > 0 else zero
        loss_feat = zero if loss_feat is None else loss_feat
        loss = args.ce_weight * loss_ce + args.kd_weight * loss_kd + args.feat_weight * loss_feat
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack([loss_ce, loss_kd, loss_feat]).detach(), z_s.detach()


def main(argv=None):
    args, t_start = parse_args(argv), time.time()  # flags that cannot be right are refused here

    # ---- set-up: one code path for one process and for torchrun ----
    device, rank, world, autocast = set_up(args)
    distributed, is_main, global_batch = dist.is_initialized(), rank == 0, args.batch_size * world
    lr = args.lr * global_batch / 64  # linear scaling from the protocol's batch of 64
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    resumed, args_json = check_run(args, device, world)  # bad input: refused before anything is written
    if resumed is not None and args_json["resume"] == "auto" and resumed["epoch"] >= args.epochs:
        return finished(args, resumed["epoch"])  # the run is done: its summary, nothing changed

    # ---- data ----
    train_x, train_y, *test_set = (t.to(device) for t in build_data(args, is_main))
    per_rank = len(train_y) // world  # each rank trains on its own slice of one shared permutation
    steps = min(math.ceil(per_rank / args.batch_size), args.max_steps or math.inf)
    normalise = Normalise(args.channels_last).to(device)

    # ---- models: student, teacher, distiller ----
    student = build_student(args)
    if args.evaluate:
        return evaluate_checkpoint(args, student.to(device, memory_format=memory_format), resumed, test_set, normalise)
    teacher, teacher_origin, teacher_expected = (build_teacher(args, int(os.environ.get("LOCAL_RANK", 0)) == 0)
                                                 if args.distill != "none" else (None,) * 3)
    teacher_top1 = score_teacher(args, teacher, teacher_origin, teacher_expected, test_set, normalise, memory_format)
    distiller = build_distiller(args, student, teacher)
    model = StudentWithDistiller(student, distiller, sync_bn=args.sync_bn and distributed)
    model.to(device, memory_format=memory_format)

    # ---- optimisation ----
    # --compile: the lr is a device tensor, whose decays change a value, not a guard of the graph (no recompiling)
    as_lr = (lambda value: torch.tensor(float(value), device=device)) if args.compile else float
    optimizer = torch.optim.SGD(model.parameters(), lr=as_lr(lr), momentum=args.momentum, weight_decay=args.wd)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_milestones, args.lr_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    # ---- resume ----
    start_epoch, best, best_epoch = load_state(resumed, args, student, distiller, optimizer, scheduler, scaler, as_lr)
    if distributed:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if is_main:  # the run writes from here on
        derived = {"world_size": world, "global_batch": global_batch, "scaled_lr": lr, "steps_per_epoch": steps}
        open_outputs(args.out_dir, {**args_json, **derived}, start_epoch)
        print(f"args: {json.dumps(args_json)}\nworld size {world} | device {device} | amp {args.amp} | global batch "
              f"{global_batch} | lr {lr:g} | {steps} steps/epoch | params: student {n_params(student):.2f}M, "
              f"distiller {n_params(distiller):.3f}M, teacher {n_params(teacher):.2f}M")
        if resumed is not None:
            print(f"resuming {args.resume}: {start_epoch} epochs done, best top1 {best:.2f} (epoch {best_epoch})")
        report_teacher(args, teacher_top1, teacher_origin, teacher_expected)

    # ---- training ----
    total_steps, t_loop, run_train_s = (args.epochs - start_epoch) * steps, time.time(), 0.0
    epoch_images = min(steps * args.batch_size, per_rank) * world  # trained per epoch, on all ranks
    shown = ["ce"] + ["kd"] * (teacher is not None and args.kd_weight > 0) + ["feat"] * (distiller is not None)
    step_args = (model, teacher, optimizer, scaler, autocast, args)
    # --compile: CUDA graphs on one GPU (at batch 64 launches bound these models); the last, partial batch runs eagerly
    mode = "reduce-overhead" if device.type == "cuda" and not distributed else None
    compiled_step = torch.compile(train_step, mode=mode, dynamic=False) if args.compile else train_step
    for epoch in range(start_epoch, args.epochs):
        batches = train_batches(train_x, train_y, normalise, args, epoch, rank, per_rank)
        model.train()
        reset_peak_memory(device)  # the record's peak is this epoch's training
        epoch_sums = torch.zeros(3, device=device)  # ce, kd, feat: summed on the device, read at log steps only
        interval, logged, t_log, data_time, t_epoch = torch.zeros(3, device=device), 0, time.time(), 0.0, time.time()
        cka = []  # [global step, CKA of z_s and its projection] at each log step: Figure 6.3
        for step in range(steps):
            t_data = time.perf_counter()
            x, y = next(batches)
            data_time += time.perf_counter() - t_data
            terms, z_s = (compiled_step if len(y) == args.batch_size else train_step)(*step_args, x, y)
            if args.compile and step == 1 and epoch == start_epoch and is_main:  # the graphs of the first two steps
                print(f"compiled the training step in {time.time() - t_epoch:.0f} s", flush=True)
            epoch_sums += terms
            interval += terms
            if (step + 1) % args.log_every == 0 or step + 1 == steps:
                losses = dict(zip(("ce", "kd", "feat"), mean_over_ranks(interval, step + 1 - logged, world)))  # a sync
                stop_if_not_finite(losses, epoch, step)  # on every rank
                now, done = time.time(), (epoch - start_epoch) * steps + step + 1
                if is_main:
                    log_line(epoch, args.epochs, step, steps, " ".join(f"{n} {losses[n]:.3f}" for n in shown),
                             float(optimizer.param_groups[0]["lr"]), (step + 1 - logged) * global_batch / (now - t_log),
                             data_time / (step + 1 - logged), (now - t_loop) / done * (total_steps - done))
                    if distiller is not None:
                        cka.append([epoch * steps + step + 1, projector_cka(distiller, z_s).item()])
                interval.zero_()
                t_log, data_time, logged = now, 0.0, step + 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_s, peak_mb = time.time() - t_epoch, peak_memory_mb(device)  # the peak before scoring: training's
        run_train_s += train_s
        loss_means = mean_over_ranks(epoch_sums, steps, world)
        epoch_lr = float(optimizer.param_groups[0]["lr"])
        scheduler.step()

        # ---- the epoch's score, checkpoint and record ----
        broadcast_buffers(student)  # every rank scores the model rank 0 saves
        metrics = {k: v for k, v in evaluate(student, test_set, normalise).items() if k != "images"}
        if metrics["top1"] > best:
            best, best_epoch = metrics["top1"], epoch + 1
        if is_main:
            record = {"epoch": epoch + 1, "lr": epoch_lr, **{f"loss_{n}": m if n in shown else None for n, m in zip(
                      ("ce", "kd", "feat"), loss_means)}, **metrics, "images_per_s": epoch_images / train_s,
                      "epoch_s": time.time() - t_epoch, "peak_mem_mb": peak_mb}
            if distiller is not None:  # every singular value of W_p, sorted (Figure 6.2); None unless it is linear
                sv = projector_spectrum(distiller)
                record["projector_sv"], record["projector_cka"] = None if sv is None else sv.tolist(), cka
            state = training_state(student, distiller, optimizer, scheduler, scaler, epoch + 1, best, best_epoch,
                                   args_json)
            write_epoch(args.out_dir, {"model": state["student"], **state}, record)  # "model": RepDistiller's key
            print(f"epoch {epoch + 1}/{args.epochs} | top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f} | best "
                  f"{best:.2f} (epoch {best_epoch}) | {record['epoch_s']:.0f} s | peak {record['peak_mem_mb']:.0f} MB",
                  flush=True)

    # ---- summary ----
    summary = write_summary(args, record, best, best_epoch, teacher_top1, t_start, (args.epochs - start_epoch)
                            * epoch_images / run_train_s, world) if is_main else None
    if distributed:
        dist.destroy_process_group()
    return summary


# ==== Appendix: the plumbing a reader of the method can skip (data, model zoo, teacher weights, checkpoints) ====
# ---- data: the python release of CIFAR-100, held on the device as uint8 and augmented there per batch ----
def build_data(args, is_main):
    """(train images, train labels, test images, test labels) as uint8 (N, 3, 32, 32) and int64 (N,): the python
    release in --data-dir (downloaded by rank 0 when missing), or --dummy's random set, the same on every rank."""
    if args.dummy:
        g = torch.Generator().manual_seed(args.seed)
        images = [torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g) for n in DUMMY_SIZES]
        labels = [torch.randint(0, NUM_CLASSES, (n,), generator=g) for n in DUMMY_SIZES]
        return images[0], labels[0], images[1], labels[1]
    root = Path(args.data_dir) / "cifar-100-python"
    if not root.is_dir() and is_main:
        from torchvision.datasets.utils import download_and_extract_archive
        fresh = [p for p in (Path(args.data_dir), *Path(args.data_dir).parents) if not p.exists()]
        try:
            download_and_extract_archive(CIFAR_URL, args.data_dir, md5=CIFAR_MD5)
        except Exception as e:
            if fresh:  # a failed download leaves no folder behind that it created
                shutil.rmtree(fresh[-1], ignore_errors=True)
            fail(f"no CIFAR-100 in {args.data_dir} and downloading {CIFAR_URL} failed ({type(e).__name__}: {e}); "
                 f"download and extract it yourself so that the layout is {LAYOUT}, or pass --dummy")
    if dist.is_initialized():
        dist.barrier()  # the other ranks wait for rank 0's download
    splits = []
    for split in ("train", "test"):
        path = root / split
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="latin1")  # the official format is a pickle: only load files you trust
            x, y = np.asarray(d["data"]), np.asarray(d["fine_labels"], dtype=np.int64)
            if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x) or len(y) == 0 \
                    or y.min() < 0 or y.max() >= NUM_CLASSES:
                raise ValueError(f"'data' is {x.dtype} {x.shape} for {len(y)} 'fine_labels', expected uint8 (N, 3072) "
                                 f"and labels in 0..{NUM_CLASSES - 1}")
        except Exception as e:
            fail(f"cannot read {path} ({type(e).__name__}: {e}); expected {LAYOUT} (from {CIFAR_URL}), or pass --dummy")
        splits += [torch.from_numpy(x).view(-1, 3, 32, 32), torch.from_numpy(y)]  # rows are planar R, G, B
    return splits


class Normalise(nn.Module):
    """uint8 (B, 3, 32, 32) -> standardised floats; the statistics are buffers on the device, not copied per batch."""

    def __init__(self, channels_last=False):
        super().__init__()
        self.register_buffer("mean", 255 * torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", 255 * torch.tensor(STD).view(1, 3, 1, 1))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x):
        return ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)


def crop_flip(x, generator):
    """Random 32x32 crop of the 4-pixel zero-padded image and horizontal flip, independently per sample. One gather
    does both: row i of the output is padded row dy + i, column j is padded column dx + j, or dx + 31 - j flipped."""
    b, dev = x.shape[0], x.device
    x = F.pad(x, (4, 4, 4, 4))
    dy, dx = torch.randint(0, 9, (2, b, 1), generator=generator, device=dev)
    flip = torch.rand(b, 1, generator=generator, device=dev) < 0.5
    ar = torch.arange(32, device=dev)
    rows, cols = dy + ar, dx + torch.where(flip, 31 - ar, ar)
    return x[torch.arange(b, device=dev).view(b, 1, 1, 1), torch.arange(3, device=dev).view(1, 3, 1, 1),
             rows.view(b, 1, 32, 1), cols.view(b, 1, 1, 32)]


def train_batches(train_x, train_y, normalise, args, epoch, rank, per_rank):
    """This rank's batches of one epoch, cropped, flipped and normalised on the device. Every random draw is a
    function of (seed, epoch, rank), so a resumed run repeats the epochs it missed: the ranks share one permutation
    of the training set, each takes its own slice, and each draws its own crops."""
    device = train_y.device
    shared = torch.Generator(device=device).manual_seed(seed_of(args.seed, epoch, 0))
    own = torch.Generator(device=device).manual_seed(seed_of(args.seed, epoch, 1 + rank))
    order = torch.randperm(len(train_y), generator=shared, device=device)[rank * per_rank:(rank + 1) * per_rank]
    for start in range(0, per_rank, args.batch_size):
        idx = order[start:start + args.batch_size]
        yield normalise(crop_flip(train_x[idx], own)), train_y[idx]


# ---- models: RepDistiller's 22 CIFAR architectures with their exact parameter and buffer names. Each forward returns
# (logits, z), z the pooled penultimate feature (the classifier's input, the one the paper distils) of width feat_dim.
def conv(k, cin, cout, stride=1, groups=1):  # a k x k convolution without bias, "same" padding
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)


def stage(block, cin, cout, n, stride, *extra):
    """n blocks; the first one changes the width and the resolution."""
    return nn.Sequential(*[block(cin if j == 0 else cout, cout, stride if j == 0 else 1, *extra) for j in range(n)])


def init_weights(model, linear_std=None):
    """The reference code's initialisation: He-normal (fan-out) convolutions, optionally N(0, std) heads."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):  # CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4)
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = conv(3, cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv(3, cout, cout), nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(conv(1, cin, cout, stride), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    def __init__(self, depth, widths, num_classes=NUM_CLASSES):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1, self.bn1 = conv(3, 3, widths[0]), nn.BatchNorm2d(widths[0])
        for i, (cin, cout, stride) in enumerate(zip(widths[:3], widths[1:], (1, 2, 2)), 1):
            self.add_module(f"layer{i}", stage(BasicBlock, cin, cout, n, stride))
        self.fc, self.feat_dim = nn.Linear(widths[3], num_classes), widths[3]
        init_weights(self)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        z = self.layer3(self.layer2(self.layer1(x))).mean((2, 3))
        return self.fc(z), z


class Bottleneck(nn.Module):  # ResNet50 (RepDistiller's resnetv2.py)
    def __init__(self, cin, cout, stride):
        super().__init__()
        planes = cout // 4
        self.conv1, self.bn1 = conv(1, cin, planes), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv(3, planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = conv(1, planes, cout), nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(conv(1, cin, cout, stride), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Sequential())

    def forward(self, x):
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet50(nn.Module):
    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.conv1, self.bn1 = conv(3, 3, 64), nn.BatchNorm2d(64)
        cin = 64
        for i, (cout, n, stride) in enumerate(zip((256, 512, 1024, 2048), (3, 4, 6, 3), (1, 2, 2, 2)), 1):
            self.add_module(f"layer{i}", stage(Bottleneck, cin, cout, n, stride))
            cin = cout
        self.linear, self.feat_dim = nn.Linear(cin, num_classes), cin
        init_weights(self)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        z = self.layer4(self.layer3(self.layer2(self.layer1(x)))).mean((2, 3))
        return self.linear(z), z


class WideBlock(nn.Module):  # wide ResNets (wrn_16_1 ... wrn_40_2): pre-activation blocks
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv(3, cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), conv(3, cout, cout)
        self.convShortcut = conv(1, cin, cout, stride) if cin != cout else None

    def forward(self, x):
        o = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return out + (x if self.convShortcut is None else self.convShortcut(o))


class WideResNet(nn.Module):
    def __init__(self, depth, widen, num_classes=NUM_CLASSES):
        super().__init__()
        n, widths = (depth - 4) // 6, (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = conv(3, 3, 16)
        for i, (cin, cout, stride) in enumerate(zip(widths[:3], widths[1:], (1, 2, 2)), 1):
            self.add_module(f"block{i}", nn.ModuleDict({"layer": stage(WideBlock, cin, cout, n, stride)}))
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc, self.feat_dim = nn.Linear(widths[3], num_classes), widths[3]
        init_weights(self)
        nn.init.zeros_(self.fc.bias)  # as RepDistiller's wrn.py (the weight keeps PyTorch's default)

    def forward(self, x):
        x = self.block3["layer"](self.block2["layer"](self.block1["layer"](self.conv1(x))))
        z = F.relu(self.bn1(x)).mean((2, 3))
        return self.fc(z), z


class VGG(nn.Module):  # vgg8 ... vgg19, the batch-norm variants, one global average pool, one linear layer
    def __init__(self, stages, num_classes=NUM_CLASSES):
        super().__init__()
        cin = 3
        for i, widths in enumerate(stages):
            layers = []
            for w in widths:
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                cin = w
            self.add_module(f"block{i}", nn.Sequential(*layers[:-1]))  # the last ReLU is in forward
        self.classifier, self.feat_dim = nn.Linear(cin, num_classes), cin
        init_weights(self, linear_std=0.01)

    def forward(self, x):
        for i in range(5):
            x = F.relu(getattr(self, f"block{i}")(x))
            x = F.max_pool2d(x, 2) if i < 3 else x  # 32 -> 4: the 4th pool only acts on 64-pixel inputs
        z = x.mean((2, 3))
        return self.classifier(z), z


def conv_bn_relu(cin, cout, k, stride):
    return nn.Sequential(conv(k, cin, cout, stride), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):  # MobileNetV2, the half-width variant of the benchmark
    def __init__(self, cin, cout, stride, t):
        super().__init__()
        h = cin * t
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(conv(1, cin, h), nn.BatchNorm2d(h), nn.ReLU(inplace=True),
                                  conv(3, h, h, stride, groups=h), nn.BatchNorm2d(h), nn.ReLU(inplace=True),
                                  conv(1, h, cout), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, t=6, width=0.5, num_classes=NUM_CLASSES):
        super().__init__()
        cin = int(32 * width)
        self.conv1 = conv_bn_relu(3, cin, 3, 2)
        self.blocks = nn.ModuleList()
        for expand, c, n, stride in ((1, 16, 1, 1), (t, 24, 2, 1), (t, 32, 3, 2), (t, 64, 4, 2), (t, 96, 3, 1),
                                     (t, 160, 3, 2), (t, 320, 1, 1)):
            self.blocks.append(stage(InvertedResidual, cin, int(c * width), n, stride, expand))
            cin = int(c * width)
        self.conv2 = conv_bn_relu(cin, 1280, 1, 1)
        self.classifier, self.feat_dim = nn.Sequential(nn.Linear(1280, num_classes)), 1280
        init_weights(self, linear_std=0.01)

    def forward(self, x):
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        z = self.conv2(x).mean((2, 3))
        return self.classifier(z), z


def channel_shuffle(x, groups):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):  # ShuffleNet V1, 3 groups
    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        mid, self.stride = cout // 4, stride
        self.g = 1 if cin == 24 else groups  # the stem's 24 channels are not grouped
        self.conv1, self.bn1 = conv(1, cin, mid, groups=self.g), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = conv(3, mid, mid, stride, groups=mid), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = conv(1, mid, cout, groups=groups), nn.BatchNorm2d(cout)

    def forward(self, x):
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1) if self.stride == 2 else out + x)


class ShuffleNetV1(nn.Module):
    def __init__(self, widths=(240, 480, 960), depths=(4, 8, 4), groups=3, num_classes=NUM_CLASSES):
        super().__init__()
        self.conv1, self.bn1 = conv(1, 3, 24), nn.BatchNorm2d(24)
        cin = 24
        for i, (cout, n) in enumerate(zip(widths, depths), 1):
            # The first block of a stage concatenates its input, so it only computes cout - cin channels.
            blocks = [ShuffleV1Block(cin, cout - cin, 2, groups)]
            blocks += [ShuffleV1Block(cout, cout, 1, groups) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            cin = cout
        self.linear, self.feat_dim = nn.Linear(cin, num_classes), cin

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        z = self.layer3(self.layer2(self.layer1(x))).mean((2, 3))
        return self.linear(z), z


class ShuffleV2Block(nn.Module):  # ShuffleNet V2 (1x): half the channels pass, the other half is transformed
    def __init__(self, c):
        super().__init__()
        c //= 2
        self.conv1, self.bn1 = conv(1, c, c), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = conv(3, c, c, groups=c), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = conv(1, c, c), nn.BatchNorm2d(c)

    def forward(self, x):
        x1, x2 = x.chunk(2, 1)
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2)))))
        return channel_shuffle(torch.cat([x1, F.relu(self.bn3(self.conv3(out)))], 1), 2)


class ShuffleV2Down(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        mid = cout // 2
        self.conv1, self.bn1 = conv(3, cin, cin, 2, groups=cin), nn.BatchNorm2d(cin)
        self.conv2, self.bn2 = conv(1, cin, mid), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = conv(1, cin, mid), nn.BatchNorm2d(mid)
        self.conv4, self.bn4 = conv(3, mid, mid, 2, groups=mid), nn.BatchNorm2d(mid)
        self.conv5, self.bn5 = conv(1, mid, mid), nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        return channel_shuffle(torch.cat([left, F.relu(self.bn5(self.conv5(right)))], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, widths=(116, 232, 464, 1024), depths=(3, 7, 3), num_classes=NUM_CLASSES):
        super().__init__()
        self.conv1, self.bn1 = conv(1, 3, 24), nn.BatchNorm2d(24)
        cin = 24
        for i, (cout, n) in enumerate(zip(widths, depths), 1):
            blocks = [ShuffleV2Down(cin, cout)] + [ShuffleV2Block(cout) for _ in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            cin = cout
        self.conv2, self.bn2 = conv(1, cin, widths[3]), nn.BatchNorm2d(widths[3])
        self.linear, self.feat_dim = nn.Linear(widths[3], num_classes), widths[3]

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        z = F.relu(self.bn2(self.conv2(x))).mean((2, 3))
        return self.linear(z), z


VGG_STAGES = {8: [[64], [128], [256], [512], [512]],
              11: [[64], [128], [256, 256], [512, 512], [512, 512]],
              13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
              16: [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
              19: [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4]}
ARCHS = {**{f"resnet{d}": partial(CifarResNet, d, (16, 16, 32, 64)) for d in (8, 14, 20, 32, 44, 56, 110)},
         **{f"resnet{d}x4": partial(CifarResNet, d, (32, 64, 128, 256)) for d in (8, 32)}, "ResNet50": ResNet50,
         **{f"wrn_{d}_{w}": partial(WideResNet, d, w) for d in (16, 40) for w in (1, 2)},
         **{f"vgg{d}": partial(VGG, stages) for d, stages in VGG_STAGES.items()},
         "MobileNetV2": MobileNetV2, "ShuffleV1": ShuffleNetV1, "ShuffleV2": ShuffleNetV2}
SMALL_LR_ARCHS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")  # the protocol trains these at lr 0.01


def build_student(args):
    return ARCHS[args.student]()


# ---- teachers: the published weights, fetched once ----
def fetch_teacher(arch, url, downloads):
    """``cifar_teachers/<arch>_vanilla/ckpt_epoch_240.pth`` of mdistiller's release tar, downloaded once into torch's
    hub cache by local rank 0 (``downloads``) while the others wait, and a line saying where it came from."""
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if downloads and not cache.is_file():
        print(f"downloading {url} to {cache}", flush=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        try:  # to a temporary name, renamed when complete: an interrupted download leaves nothing trusted
            torch.hub.download_url_to_file(url, str(cache))
        except Exception as e:
            fail(f"cannot download the published teachers from {url} ({type(e).__name__}: {e}); fetch "
                 f"{TEACHERS_URL} by hand and pass --teacher-url file:///path/to/cifar_teachers.tar, or train a "
                 f"teacher (--student {arch} --distill none) and pass --teacher-ckpt")
    if dist.is_initialized():
        dist.barrier()  # the other ranks wait for the download
    member = f"cifar_teachers/{arch}_vanilla/ckpt_epoch_240.pth"
    try:
        with tarfile.open(cache) as tar:
            names = {name.removeprefix("./"): name for name in tar.getnames()}
            if member not in names:
                fail(f"{cache} (from {url}) holds no {member}; pass a --teacher-url of the release's tar, or "
                     f"--teacher-ckpt")
            checkpoint = torch.load(io.BytesIO(tar.extractfile(names[member]).read()), map_location="cpu",
                                    weights_only=True)
    except (tarfile.TarError, OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
        reason = str(e).strip().splitlines()[0][:120]
        fail(f"cannot read {member} from {cache} ({type(e).__name__}: {reason}): a truncated or corrupt tar; "
             "delete it and run again, or pass --teacher-url file:///path/to/cifar_teachers.tar or --teacher-ckpt")
    return checkpoint, f"{member} of {url}"


def build_teacher(args, downloads):
    """The frozen teacher, where its weights came from (--teacher-ckpt, the published teacher, or --dummy's random
    weights) and the test accuracy a published teacher must reproduce (its checkpoint's ``accuracy``, else CRD's)."""
    teacher, expected = ARCHS[args.teacher](), None
    if args.teacher_ckpt:
        load_weights(teacher, read_checkpoint(args.teacher_ckpt), args.teacher_ckpt, f"teacher {args.teacher}")
        origin = f"from {args.teacher_ckpt}"
    elif args.dummy and not args.teacher_url:
        origin = "RANDOMLY INITIALISED: --dummy without --teacher-ckpt or --teacher-url"
    else:
        checkpoint, origin = fetch_teacher(args.teacher, args.teacher_url or TEACHERS_URL, downloads)
        load_weights(teacher, checkpoint, origin, f"teacher {args.teacher}")
        origin = f"published, {origin}"
        expected = float(checkpoint.get("accuracy", PUBLISHED_TOP1[args.teacher]))
    # Frozen, and in eval mode for good: it keeps the batch-norm statistics it was trained with.
    return teacher.requires_grad_(False).eval(), origin, expected


@torch.no_grad()
def evaluate(model, test_set, normalise, batch_size=256):
    """Top-1/top-5 (%) on the whole set, in float32 whatever --amp trains in: each rank scores its own contiguous
    shard (no image dropped or counted twice) and the counts are summed across ranks; `images` is the number scored."""
    images, labels = test_set
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n, was_training = len(labels), model.training
    model.eval()
    start, stop = rank * n // world, (rank + 1) * n // world
    counts = torch.zeros(3, device=labels.device, dtype=torch.float64)  # top-1 hits, top-5 hits, images
    counts[2] = stop - start
    with float32_scores():
        for i in range(start, stop, batch_size):
            j = min(i + batch_size, stop)
            logits = model(normalise(images[i:j]))[0]
            hits = logits.topk(5, 1).indices == labels[i:j, None]
            counts[:2] += torch.stack([hits[:, 0].sum(), hits.any(1).sum()])
    if dist.is_initialized():
        dist.all_reduce(counts)
    model.train(was_training)
    top1, top5, n = counts.tolist()
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "images": int(n)}


# ---- the run's bookkeeping: this task's ----
def evaluate_checkpoint(args, student, resumed, test_set, normalise):
    """--evaluate: the test top-1/top-5 of --resume's student weights, printed, written to eval.json and returned."""
    load_weights(student, resumed, args.resume, f"student {args.student}")
    metrics = evaluate(student, test_set, normalise)
    record = {"checkpoint": str(args.resume), "student": args.student, **metrics}
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"{args.resume}: top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f} on {metrics['images']} images")
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        save_atomic(json.dumps(record, indent=2) + "\n", Path(args.out_dir) / "eval.json")
    if dist.is_initialized():
        dist.destroy_process_group()
    return record


def score_teacher(args, teacher, origin, expected, test_set, normalise, memory_format):
    """The teacher's test top-1 (None without one), before anything is written. A published teacher's accuracy is
    its checksum: one more than TEACHER_TOLERANCE off is a wrong file or a wrong normalisation, and stops the run."""
    if teacher is None:
        return None
    teacher.to(test_set[1].device, memory_format=memory_format)
    top1 = evaluate(teacher, test_set, normalise)["top1"]
    if expected is not None and not args.dummy and abs(top1 - expected) > TEACHER_TOLERANCE:
        fail(f"the teacher ({origin}) scores {top1:.2f} on the test set, not the {expected:.2f} it was published "
             f"with; delete the cached tar under {Path(torch.hub.get_dir()) / 'checkpoints'} and run again, or pass "
             "--teacher-ckpt")
    return top1


def report_teacher(args, top1, origin, expected):
    """The teacher's line, and a warning when a --teacher-ckpt of a published architecture scores far from it."""
    if top1 is None:
        return
    published = PUBLISHED_TOP1.get(args.teacher)
    print(f"teacher {args.teacher} ({origin}): top1 {top1:.2f}"
          + (f" (published: {expected:.2f})" if expected is not None else ""))
    if args.teacher_ckpt and published and not args.dummy and abs(top1 - published) > TEACHER_TOLERANCE:
        print(f"warning: the teacher scores {top1:.2f}, far from the {published} of the public {args.teacher}; "
              "check the checkpoint and --teacher")


def load_state(resumed, args, student, distiller, optimizer, scheduler, scaler, as_lr):
    """(epochs done, best top-1, its epoch): a new run's, or those of the --resume checkpoint, whose weights and
    optimizer, scheduler and scaler states are loaded."""
    if resumed is None:
        return 0, -1.0, 0
    load_weights(student, resumed["student"], args.resume, f"student {args.student}")
    if distiller is not None:
        load_weights(distiller, resumed["distiller"], args.resume, "distiller")
    optimizer.load_state_dict(resumed["optimizer"])
    for group in optimizer.param_groups:  # this run's lr type, whatever the saving run's --compile was
        group["lr"] = as_lr(group["lr"])
    scheduler.load_state_dict(resumed["scheduler"])
    if resumed["scaler"]:  # a bf16 or float32 run saved a disabled scaler's {}: resuming it in fp16 starts afresh
        scaler.load_state_dict(resumed["scaler"])
    return resumed["epoch"], resumed["best"], resumed["best_epoch"]


def write_summary(args, record, best, best_epoch, teacher_top1, t_start, images_per_s, world):
    """summary.json, the run in one record (returned, and what main returns), and the last line."""
    summary = {"metric": "top1", "best": best, "best_epoch": best_epoch, "last": record["top1"],
               "last_top5": record["top5"], "teacher": teacher_top1, "student_arch": args.student,
               "teacher_arch": args.teacher if teacher_top1 is not None else None, "distill": args.distill,
               "wall_s": time.time() - t_start, "images_per_s": images_per_s,
               "peak_mem_mb": run_peak_mb(args.out_dir), "world_size": world, "versions": versions()}
    save_atomic(json.dumps(summary, indent=2) + "\n", Path(args.out_dir) / "summary.json")
    print(f"done: best top1 {best:.2f} (epoch {best_epoch}), last top1 {record['top1']:.2f} | "
          f"{summary['wall_s'] / 60:.1f} min | {Path(args.out_dir)}")
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


def mean_over_ranks(sums, count, world):
    """The means of per-step sums kept on the device, over every rank's ``count`` steps, as floats: a host-device
    sync, so only at log steps and at the end of an epoch."""
    if dist.is_initialized():
        dist.all_reduce(sums)
    return (sums / (count * world)).tolist()


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
