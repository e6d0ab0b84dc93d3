"""ImageNet: distil a torchvision ResNet-34 into a ResNet-18 trained from scratch, with the recipe of
"Understanding the Role of the Projector in Knowledge Distillation" (Miles & Mikolajczyk, AAAI 2024).

    loss = CE(y_s, y) + 1.0 * KL(softmax(y_t) || softmax(y_s)) + 2.0 * log sum |BN(z_s W_p) - BN(z_t)|^4

``z_s``, ``z_t`` are the representations just before the output space (the pooled 512-d features of both
ResNets), ``W_p`` a linear projector trained with the student, BN a batch norm without affine parameters
on both sides. The protocol is torchdistill's standard configuration, which the paper ran: 100 epochs, SGD
with momentum 0.9, lr 0.1 at a global batch of 256 (scaled linearly), weight decay 1e-4, lr x0.1 at epochs
30, 60 and 90. Expected top-1: 71.87 (the SRD row of thesis Table 6.6, top-5 error 9.29, which the official
code's README calls a re-run) and 71.63 (Table 6.9's soft-maximum row, the paper's figure according to the first
author's torchdistill PR #446); teacher 73.31 (torchvision's ResNet34_Weights.IMAGENET1K_V1); ResNet-18 alone 69.76
(torchvision's published model, its own 90-epoch recipe, not a --distill none run of this script).

One GPU, 8 GPUs, two machines of 8 GPUs (``--batch-size`` is per process; the global batch stays 256)::

    python imagenet_kd.py --data-dir /data/imagenet
    torchrun --nproc_per_node=8 imagenet_kd.py --data-dir /data/imagenet
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        imagenet_kd.py --data-dir /data/imagenet

``--data-dir`` is ImageNet in the ImageFolder layout; the teacher's weights come from torchvision (fetched once into the
torch hub cache) or ``--teacher-ckpt``; ``--dummy`` runs on random images (the speed benchmark without JPEG decoding).
Any torchvision pair works: the paper's ablations (Tables 6.1-6.3) distil RegNetY into MobileNetV2, ViT into
MobileNetV3, ConvNeXt into EfficientNet-B0 and ResNet-50 into ResNet-18 on a class-balanced 20 % of the training set
(``--train-fraction 0.2``). A run prints the teacher's top-1, a line per ``--log-every`` steps and the validation
top-1/top-5 per epoch, and writes ``args.json``, ``metrics.jsonl``, ``last.pt``, ``best.pt`` and ``summary.json`` into
``--out-dir``; ``--resume OUT/last.pt`` continues exactly.
"""
import argparse
import importlib.metadata
import datetime
import json
import math
import os
import platform
import re
import resource
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import datasets, models
from torchvision.transforms import v2

from common import DISTANCES, NORMS, PROJECTORS, FeatureDistiller, projector_cka, projector_spectrum

PROG = Path(__file__).stem
TEACHER_TOLERANCE = 1.0  # points (top-1; COCO: AP) a teacher may be off its published score before the run says so
FIXED_INPUT_SIZE = True  # every batch has --img-size: cuDNN may pick its fastest kernels once
ARCHS = models.list_models(module=models)
HEADS = ("fc", "classifier", "heads", "head")  # the final classifier block of torchvision's models
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as torchvision's weights expect
# --dummy: ImageNet's training length and classes; a validation set of a few batches (chance accuracy on
# random images: evaluating them only exercises the code).
DUMMY_TRAIN, DUMMY_VAL, DUMMY_CLASSES = 1_281_167, 256, 1000
# What makes a resumed run the same run: the data, the models, the distiller, the optimiser and its schedule (all
# but --epochs). The loss weights may change (a resume may re-weigh the objective), as may speed, logging and output
# flags. The world size is checked too.
RESUME_MUST_MATCH = ("dummy", "data_dir", "train_fraction", "img_size", "student", "teacher", "distill", "projector",
                     "projector_hidden", "norm", "distance", "alpha", "batch_size", "lr", "momentum", "wd",
                     "lr_milestones")
LAYOUT = ("<data-dir>/train/<class>/*.JPEG and <data-dir>/val/<class>/*.JPEG (the ImageFolder layout; sort the 50,000 "
          "validation images into class folders, e.g. with the valprep.sh script of pytorch/examples/imagenet)")


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
    g.add_argument("--data-dir", type=Path, default=Path("data/imagenet"), help=f"ImageNet root: {LAYOUT}")
    g.add_argument("--dummy", action="store_true", help="random images of the right size and 1000 classes instead of "
                   "--data-dir; with no --teacher-ckpt the teacher is random (a speed benchmark without JPEG decoding)")
    g.add_argument("--train-fraction", type=float, default=1.0, help="class-balanced share of the training set, the "
                   "same images in every run with this value (the paper's Tables 6.1-6.3 use 0.2; its Figure 6.2 on "
                   "0.2 with the log-sum is our reading, the paper does not say); the validation set stays whole")
    g.add_argument("--img-size", type=int, default=224,
                   help="training crop; validation resizes to img-size*256/224 and centre-crops img-size")
    g = p.add_argument_group("models")
    g.add_argument("--student", default="resnet18", metavar="ARCH",
                   help="torchvision classification model, trained from scratch")
    g.add_argument("--teacher", default="resnet34", metavar="ARCH", help="torchvision classification model, frozen")
    g.add_argument("--teacher-ckpt", type=Path, metavar="PATH", help="teacher weights (a state dict, or one under "
                   "'model', 'state_dict' or 'student'); default: torchvision's pretrained --teacher-weights")
    g.add_argument("--teacher-weights", default="DEFAULT", help="tag of torchvision's weight enum for the teacher: "
                   "DEFAULT is torchvision's best, for resnet34 its only one, IMAGENET1K_V1, which the paper used")
    g = p.add_argument_group("distillation")
    g.add_argument("--distill", choices=("none", "kd", "srd"), default="srd", help="none: CE only; kd: CE + KL; srd "
                   "(Simple Recipe Distillation, the paper's): CE + KL + feature loss")
    g.add_argument("--ce-weight", type=float, default=1.0, help="weight of the cross-entropy")
    g.add_argument("--kd-weight", type=float, default=1.0, help="weight of the KL term")
    g.add_argument("--feat-weight", type=float, default=2.0, help="weight of the feature loss")
    g.add_argument("--temperature", type=float, default=1.0, help="KD temperature T (the KL term is scaled by T^2)")
    g.add_argument("--alpha", type=float, default=4.0, help="exponent of the log-sum distance")
    g.add_argument("--norm", choices=NORMS, default="bn", help="normalisation of z_s W_p and z_t, no affine: bn (the "
                   "paper's), gn (Table 6.1; eps 1e-4 where the official code's has 0: a departure), ln, l2; none: no "
                   "normalisation")
    g.add_argument("--projector", choices=PROJECTORS, default="linear", help="W_p: linear (the "
                   "paper's); mlp: Linear-BN-ReLU-Linear (our reading of the paper's 'MLP'); mlp-plain: "
                   "Linear-ReLU-Linear (the official code's); none: the identity")
    g.add_argument("--projector-hidden", type=int,
                   help="hidden width of the 'mlp' projector (default: the teacher's feature width)")
    g.add_argument("--distance", choices=DISTANCES, default="logsum", help="logsum: the paper's log sum |d|^alpha; "
                   "corr: the official DeiT code's correlation form; mean: mean |d|^alpha (no log: Tables 6.3, 6.9; "
                   "averaged over batch and dimensions where the paper writes a squared norm: our reading); "
                   "corr-nolog: the correlation form without the log")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100, help="training epochs")
    g.add_argument("--max-steps", type=int, help="cap on the steps of each epoch (smoke tests, benchmarks)")
    g.add_argument("--batch-size", type=int, help="images per process (default: 256 / number of processes)")
    g.add_argument("--lr", type=float, default=0.1, help="SGD lr per 256 images of global batch (scaled linearly)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--wd", type=float, default=1e-4, help="weight decay")
    g.add_argument("--lr-milestones", type=int, nargs="+", default=[30, 60, 90], help="epochs where lr drops x0.1")
    g = p.add_argument_group("system")
    g.add_argument("--amp", choices=("off", "bf16", "fp16"), help="autocast dtype (default: bf16 on GPUs that have it "
                   "natively, else fp16; off on CPU); off is true float32, as the paper trained; every score is "
                   "float32")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="NHWC memory layout, faster convolutions on GPUs (default: on with CUDA, off on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the student with its distiller, and the "
                   "teacher: one graph each, with no break, its backward compiled too (DDP splits the student's at "
                   "its gradient buckets); the loss terms, the scaler and the optimizer step run eagerly")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    g.add_argument("--sync-bn", action="store_true", help="the student's batch-norm statistics over the global batch "
                   "(DDP, CUDA); the distiller's see the global batch already")
    g.add_argument("--workers", type=int,
                   help="data-loading processes per training process (default: its share of the cores, at most 12)")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling and augmentation")
    g.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    g = p.add_argument_group("outputs")
    g.add_argument("--out-dir", type=Path, help="output folder (default: the folder of --resume, else "
                   f"runs/{PROG}-<student>-<distill>, with -dummy for --dummy runs)")
    g.add_argument("--resume", metavar="auto|PATH", help="continue a run: auto, from the out-dir's last.pt if there is "
                   "one, else start (one command for the first launch and every restart); or a last.pt; flags not "
                   "given take the run's own values; with --evaluate, the weights to score (any format)")
    g.add_argument("--evaluate", action="store_true", help="evaluate the --resume checkpoint's student and exit")
    args = parse_resuming(p, argv, resolve_defaults)  # a resume takes its run's flags for those not given
    if not 0 < args.train_fraction <= 1:
        fail(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    for name in ("epochs", "batch_size", "log_every", "max_steps", "alpha", "temperature"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("lr", "wd"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    for role in ("student", "teacher"):
        if getattr(args, role) not in ARCHS:
            fail(f"unknown {role} architecture {getattr(args, role)!r}; choose from {', '.join(ARCHS)}")
    return args


def resolve_defaults(args):
    """The defaults that depend on other flags or on the machine, resolved once (args.json records them)."""
    cuda = args.device.startswith("cuda")
    if args.amp is None:  # bf16 where the GPU computes it natively; emulated (V100, T4) it is slower than fp16
        args.amp = ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16") if cuda else "off"
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    if args.batch_size is None:
        args.batch_size = max(1, 256 // int(os.environ.get("WORLD_SIZE", 1)))
    if args.workers is None:  # never more than the cores
        args.workers = max(1, min(12, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    args.out_dir = args.out_dir or (Path(args.resume).parent if args.resume not in (None, "auto") else
                                    Path("runs") / f"{PROG}-{args.student}-{args.distill}{'-dummy' * args.dummy}")
    return args


# ---- the method: z_s and z_t (the classifier's input), the student with its distiller, the KD term, the step ----
def feature_point(model):
    """The module whose input is z, the paper's "representation just before the output space": the input of
    the classifier block's last linear layer, before the dropout in front of it (z_t has none: the teacher is in
    eval mode). ResNet/RegNet: the pooled features (``fc``); MobileNetV2, EfficientNet: the pooled features;
    MobileNetV3: the 1280-d Linear-Hardswish output, its last hidden layer (not the 960-d pooled map);
    ConvNeXt: the pooled features after its LayerNorm; ViT: the class token after the encoder's LayerNorm."""
    head = getattr(model, head_name(model))
    layers = list(head.children()) if isinstance(head, nn.Sequential) else [head]
    last = max((i for i, m in enumerate(layers) if isinstance(m, nn.Linear)), default=None)
    if last is None:
        return head  # no linear layer (SqueezeNet's convolutional head): its input map, pooled
    while last > 0 and isinstance(layers[last - 1], nn.Dropout):
        last -= 1
    return layers[last]


class WithFeatures(nn.Module):
    """``model(x) -> (logits, z)``, z the input of ``feature_point(model)``, pooled, caught by a forward pre-hook: the
    model and its state-dict keys stay torchvision's, so a saved student loads into a plain ``models.resnet18()``."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        for module in model.modules():  # an in-place dropout would overwrite the z the hook holds
            if isinstance(module, nn.Dropout):
                module.inplace = False
        feature_point(model).register_forward_pre_hook(self._keep)

    def _keep(self, module, inputs):
        self._z = inputs[0]

    def forward(self, x):
        logits = self.model(x)
        z, self._z = self._z, None
        return logits, z.mean((2, 3)) if z.dim() == 4 else z.flatten(1)  # SqueezeNet passes maps


class StudentWithDistiller(nn.Module):
    """The student and the distiller in one module: DDP averages the projector's gradients with the
    student's, so W_p is identical on every rank."""

    def __init__(self, student, distiller, sync_bn=False):
        super().__init__()
        # --sync-bn syncs the student's batch norms alone, in place: the distiller's see the global batch already,
        # and a synced BN in an MLP projector would make the CKA that rank 0 takes at a log step a collective
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student) if sync_bn else student
        self.student, self.distiller = WithFeatures(student), distiller

    def forward(self, x, z_t=None):
        logits, z_s = self.student(x)
        return logits, (self.distiller(z_s, z_t) if self.distiller is not None else None), z_s


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
        return FeatureDistiller(feature_dim(student, args.img_size), feature_dim(teacher, args.img_size),
                                args.projector, args.norm, args.distance, args.alpha, hidden=args.projector_hidden)
    except ValueError as e:  # e.g. --projector none with different widths
        fail(str(e))


def train_step(model, teacher, optimizer, scaler, autocast, args, x, y):
    """One step of the paper's objective, CE + kd_weight * KL + feat_weight * the feature loss; returns the unweighted
    terms (ce, kd, feat) and the student's features z_s, left on the device. An unused term is 0."""
    with autocast:
        logits_t = z_t = None
        if teacher is not None:
            with torch.no_grad():
                logits_t, z_t = teacher(x)
        logits_s, loss_feat, z_s = model(x, z_t)
        loss_ce = F.cross_entropy(logits_s, y)
        zero = torch.zeros((), device=x.device)
        loss_kd = zero if teacher is None else kd_loss(logits_s, logits_t, args.temperature)
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
    lr = args.lr * global_batch / 256  # linear scaling rule (Goyal et al.)
    prepare = Prepare(device, args.channels_last)
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
        return evaluate_checkpoint(args, student.to(device, memory_format=memory_format), val_loader, device, prepare)
    teacher, teacher_tag, published = build_teacher(args, classes) if args.distill != "none" else (None,) * 3
    model = StudentWithDistiller(student, None, sync_bn=args.sync_bn and distributed)  # the distiller joins once
    # both feature widths are known
    distiller = model.distiller = build_distiller(args, model.student, teacher)
    model.to(device, memory_format=memory_format)
    if teacher is not None:
        teacher.to(device, memory_format=memory_format)

    # ---- optimisation ----
    if distributed:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    if args.compile:
        model = torch.compile(model)
        teacher = torch.compile(teacher) if teacher is not None else None
    # Weight decay on every parameter (torchvision's reference recipe); the projector W_p trains with the student.
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.wd)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_milestones, gamma=0.1)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    # ---- resume ----
    start_epoch, best, best_epoch = load_state(resumed, args, distiller, optimizer, scheduler, scaler)
    if is_main:  # the run writes from here on
        open_outputs(args.out_dir, args_json, start_epoch)
        print(f"args: {json.dumps(args_json)}\nworld size {world} | device {device} | amp {args.amp} | global batch "
              f"{global_batch} | lr {lr:g} | {steps} steps/epoch | params: student {n_params(student):.2f}m, "
              f"distiller {n_params(distiller):.2f}m, teacher {n_params(teacher):.2f}m | {args.workers} "
              f"workers/process | {classes} classes | {len(train_loader.dataset):,} training images")
        if resumed is not None:
            print(f"resuming {args.resume}: {start_epoch} epochs done, best top1 {best:.2f} (epoch {best_epoch})")
    teacher_top1 = score_teacher(args, teacher, teacher_tag, published, val_loader, device, prepare)

    # ---- training ----
    shown = ["ce"] + ["kd"] * (teacher is not None) + ["feat"] * (distiller is not None)  # the terms logged
    t_loop, total_steps, train_time = time.time(), steps * (args.epochs - start_epoch), 0.0
    for epoch in range(start_epoch, args.epochs):
        torch.manual_seed(seed_of(args.seed, epoch, rank))  # dropout and the like: a function of (seed, epoch, rank)
        train_loader.sampler.set_epoch(epoch)
        reset_peak_memory(device)  # the record's peak is this epoch's training
        epoch_lr = optimizer.param_groups[0]["lr"]
        interval, epoch_sums = torch.zeros(3, device=device), torch.zeros(3, dtype=torch.float64)
        t_epoch = t_log = t_ready = time.time()
        data_time, logged = 0.0, 0  # logged: the steps of this epoch up to the last log line
        cka = []  # [global step, CKA of z_s and its projection] at each log step: Figure 6.3
        for step, (x, y) in enumerate(train_loader):
            data_time += time.time() - t_ready
            x, y = prepare(x, y)
            terms, z_s = train_step(model, teacher, optimizer, scaler, autocast, args, x, y)
            interval += terms.float()
            if (step + 1) % args.log_every == 0 or step + 1 == steps:  # the only host-device syncs of the loop
                losses = dict(zip(("ce", "kd", "feat"), mean_over_ranks(interval, step + 1 - logged, world)))
                epoch_sums += interval.double().cpu()
                interval.zero_()
                stop_if_not_finite(losses, epoch, step)  # on every rank
                now, done = time.time(), (epoch - start_epoch) * steps + step + 1
                if is_main:
                    log_line(epoch, args.epochs, step, steps, " ".join(f"{n} {losses[n]:.3f}" for n in shown),
                             epoch_lr, (step + 1 - logged) * global_batch / (now - t_log),
                             data_time / (step + 1 - logged), (now - t_loop) / done * (total_steps - done))
                    if distiller is not None:
                        cka.append([epoch * steps + step + 1, projector_cka(distiller, z_s).item()])
                t_log, data_time, logged = now, 0.0, step + 1
            if step + 1 == steps:
                break
            t_ready = time.time()
        scheduler.step()
        epoch_train_s, peak_mb = time.time() - t_epoch, peak_memory_mb(device)  # the peak before scoring: training's
        train_time += epoch_train_s

        # ---- the epoch's score, checkpoint and record ----
        broadcast_buffers(student)  # every rank scores the model rank 0 saves
        metrics = evaluate(student, val_loader, device, prepare)
        if best is None or metrics["top1"] > best:
            best, best_epoch = metrics["top1"], epoch + 1
        if is_main:
            record = {"epoch": epoch + 1, "lr": epoch_lr, **{f"loss_{n}": m if n in shown else None for n, m in zip(
                      ("ce", "kd", "feat"), (epoch_sums / (steps * world)).tolist())}, **metrics,
                      "images_per_s": steps * global_batch / epoch_train_s, "epoch_s": time.time() - t_epoch,
                      "peak_mem_mb": peak_mb}
            if distiller is not None:  # every singular value of W_p, sorted (Figure 6.2); None unless it is linear
                sv = projector_spectrum(distiller)
                record["projector_sv"], record["projector_cka"] = None if sv is None else sv.tolist(), cka
            write_epoch(args.out_dir, training_state(student, distiller, optimizer, scheduler, scaler, epoch + 1, best,
                                                     best_epoch, args_json), record)
            print(f"epoch {epoch + 1}/{args.epochs} | top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f} | best "
                  f"{best:.2f} (epoch {best_epoch}) | {record['epoch_s']:.0f} s | peak {record['peak_mem_mb']:.0f} MB")

    # ---- summary ----
    summary = write_summary(args, metrics, best, best_epoch, teacher_top1, teacher_tag, published, t_start,
                            total_steps * global_batch / train_time, world) if is_main else None
    if distributed:
        dist.destroy_process_group()
    return summary


# ==== Appendix: the plumbing a reader of the method can skip (data, model zoo, teacher weights, checkpoints) ====
class EpochSampler(DistributedSampler):
    """DistributedSampler (this rank's shard of a per-epoch permutation) that yields (epoch, index)."""

    def __iter__(self):
        return ((self.epoch, i) for i in super().__iter__())


class Augmented(Dataset):
    """The random augmentation of image ``index`` in epoch ``epoch`` is seeded by (seed, epoch, index): independent of
    workers, persistent workers and world size, so a resume sees exactly the images of the uninterrupted run."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        epoch, index = item
        with torch.random.fork_rng(devices=[]):  # transforms v2 draw from torch's global CPU generator
            torch.default_generator.manual_seed(seed_of(self.seed, epoch, index))
            return self.dataset[index]


def balanced_subset(labels, fraction):
    """Indices of round(fraction * n_c) images (at least one) of each class c, drawn by a generator of fixed seed: a
    function of the labels and the fraction only, so every rank and every resume trains on the same images."""
    g, counts = torch.Generator().manual_seed(0), torch.bincount(labels).tolist()
    keep = [members[torch.randperm(len(members), generator=g)[:max(1, round(fraction * len(members)))]]
            for members in torch.split(labels.argsort(stable=True), counts) if len(members)]
    return torch.cat(keep).sort().values.tolist()


class DummyImages(Dataset):
    """``length`` random uint8 images with labels ``index % classes``, drawn from a fixed pool of 64 so that
    an item costs a copy, not a random draw: the loader never limits a --dummy benchmark."""

    def __init__(self, length, size, classes=DUMMY_CLASSES):
        self.length, self.classes, self.targets = length, classes, torch.arange(length) % classes
        g = torch.Generator().manual_seed(0)
        self.pool = torch.randint(0, 256, (64, 3, size, size), dtype=torch.uint8, generator=g)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return self.pool[index % len(self.pool)], index % self.classes  # collation copies it


def build_data(args, device, rank, world):
    """(training loader, validation loader, classes): this rank's shards of the train/val ImageFolders (or
    --dummy images) as uint8 batches; a folder in the wrong layout fails with the expected one."""
    if args.dummy:
        train_set, val_set = DummyImages(DUMMY_TRAIN, args.img_size), DummyImages(DUMMY_VAL, args.img_size)
    else:
        folders, transforms = {}, {  # PIL decodes (it copes with ImageNet's few CMYK and greyscale JPEGs), resizes
            "train": v2.Compose([v2.RandomResizedCrop(args.img_size), v2.RandomHorizontalFlip(), v2.PILToTensor()]),
            "val": v2.Compose([v2.Resize(round(args.img_size * 256 / 224)), v2.CenterCrop(args.img_size),
                               v2.PILToTensor()])}
        for split, transform in transforms.items():
            folder = args.data_dir / split
            if not folder.is_dir():
                fail(f"{folder} is not a directory; expected {LAYOUT}; or try --dummy (random images)")
            if any(f.suffix.lower() in (".jpeg", ".jpg", ".png") for f in folder.iterdir()):
                fail(f"{folder} holds images directly instead of one folder per class; expected {LAYOUT}")
            try:
                folders[split] = datasets.ImageFolder(folder, transform=transform)
            except (FileNotFoundError, OSError) as e:
                reason = str(e).split(". Supported")[0]
                fail(f"{folder} is not a class-per-folder image dataset ({reason[:150]}"
                     f"{'...' * (len(reason) > 150)}); expected {LAYOUT}")
        train_set, val_set = folders["train"], folders["val"]
        if train_set.classes != val_set.classes:
            missing = sorted(set(train_set.classes) ^ set(val_set.classes))[:5]
            fail(f"train/ and val/ under {args.data_dir} have different class folders (e.g. {', '.join(missing)}); "
                 "both need one folder per class, with the same names")
    classes = DUMMY_CLASSES if args.dummy else len(train_set.classes)
    if args.train_fraction < 1:
        train_set = Subset(train_set, balanced_subset(torch.as_tensor(train_set.targets), args.train_fraction))
    # Every rank takes the same number of full batches per step (drop_last twice): the distiller's global
    # batch gathers equal shares (torchdistill, which the paper ran, keeps the last partial batch: 143 images
    # at 256). Each rank evaluates images rank, rank + world, ...: none padded, none dropped.
    sampler = EpochSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    kw = dict(num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    train_loader = DataLoader(Augmented(train_set, args.seed), args.batch_size, sampler=sampler, drop_last=True, **kw)
    if len(train_loader) == 0 and not args.evaluate:
        fail(f"the training set ({len(train_loader.dataset)} images) is smaller than one global batch of "
             f"{args.batch_size * world}; lower --batch-size")
    # The validation workers live only while scoring, not idle beside the training ones. A forkserver starts them: a
    # fork per evaluation from this process, whose other threads may hold the interpreter's thread-list lock at that
    # moment, can leave the new worker deadlocked for good (CPython before 3.12; it hung a 2-process run here).
    kw |= dict(persistent_workers=False, multiprocessing_context="forkserver" if args.workers > 0 else None)
    return train_loader, DataLoader(Subset(val_set, range(rank, len(val_set), world)), args.batch_size, **kw), classes


class Prepare:
    """uint8 NCHW batch on the host -> normalised float on the device: a quarter of the bytes of
    float32 to copy, and the normalisation runs on the accelerator instead of in the loader workers."""

    def __init__(self, device, channels_last):
        self.device, self.channels_last = device, channels_last
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, images, labels):
        images = (images.to(self.device, non_blocking=True).float() - self.mean) / self.std
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)


def head_name(model):
    return next(name for name in HEADS if isinstance(getattr(model, name, None), nn.Module))


def feature_dim(net, img_size):
    """The feature width, read from a dry forward in eval mode (never hard-coded); every submodule's
    mode is restored, so the frozen teacher stays in eval mode."""
    modes = [(module, module.training) for module in net.modules()]
    net.eval()
    with torch.no_grad():
        dim = net(torch.zeros(1, 3, img_size, img_size))[1].shape[1]
    for module, training in modes:
        module.training = training
    return dim


def get_model(arch, classes, img_size, **kwargs):
    """torchvision's ``arch``, refused in one line where it cannot take ``img_size`` (a dry forward tells)."""
    model = models.get_model(arch, num_classes=classes, **kwargs)
    if getattr(model, "image_size", img_size) != img_size:  # torchvision's ViTs embed a fixed number of patches
        fail(f"{arch} takes {model.image_size}-px images only; pass --img-size {model.image_size}")
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, img_size, img_size))
    except RuntimeError as e:  # inception_v3 needs 75 px, say
        reason = str(e).splitlines()[0][:120].strip()
        fail(f"{arch} cannot take {img_size}-px images ({reason}); pass a larger --img-size")
    return model.train()


def build_student(args, classes):
    # GoogLeNet and Inception v3 train with auxiliary heads, whose training output is a namedtuple, not logits: the
    # student is built without them, as torchvision builds these models for use
    aux = {"aux_logits": False, "init_weights": True} if args.student in ("googlenet", "inception_v3") else {}
    return get_model(args.student, classes, args.img_size, **aux)


def build_teacher(args, classes):
    """(teacher, weights tag, published top-1 or None): ``teacher(x) -> (logits, z_t)``, frozen, in eval mode
    (BN running statistics, no dropout), with --teacher-ckpt's weights, torchvision's, or random under --dummy."""
    teacher, published = get_model(args.teacher, classes, args.img_size), None
    if args.teacher_ckpt:
        checkpoint = read_checkpoint(args.teacher_ckpt)
        check_classes(teacher, checkpoint, args.teacher_ckpt, classes)
        load_weights(teacher, checkpoint, args.teacher_ckpt, "teacher")
        tag = str(args.teacher_ckpt)
    elif args.dummy:
        tag = "random (--dummy without --teacher-ckpt)"
    else:
        if classes != 1000:
            fail(f"torchvision's pretrained {args.teacher} has 1000 classes but {args.data_dir} has {classes}; "
                 "pass --teacher-ckpt trained on this dataset")
        first = int(os.environ.get("LOCAL_RANK", 0)) == 0
        if dist.is_initialized() and not first:
            dist.barrier()  # local rank 0 fills the hub cache first; the others then read it
        try:
            weights = models.get_model_weights(args.teacher)[args.teacher_weights]
        except (KeyError, ValueError):
            fail(f"torchvision has no weights {args.teacher_weights!r} for {args.teacher}; pass --teacher-ckpt "
                 f"or one of {', '.join(w.name for w in models.get_model_weights(args.teacher))}")
        try:
            state = weights.get_state_dict(progress=int(os.environ.get("RANK", 0)) == 0, check_hash=True)
        except Exception as e:
            fail(f"cannot download the teacher's weights {weights} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                 "pass --teacher-ckpt PATH, or run once with network access to fill the torch hub cache")
        if dist.is_initialized() and first:
            dist.barrier()
        load_weights(teacher, state, str(weights), "teacher weights")
        tag, published = str(weights), weights.meta["_metrics"]["ImageNet-1K"]["acc@1"]
    return WithFeatures(teacher).requires_grad_(False).eval(), tag, published


def check_classes(model, checkpoint, path, classes):
    """Name a class-count mismatch in those words (load_weights would name a wrongly shaped key)."""
    key = [k for k in model.state_dict() if k.split(".")[0] == head_name(model)][-1]  # the logits layer's
    nested = [checkpoint.get(k) for k in ("model", "state_dict", "student")] if isinstance(checkpoint, dict) else []
    rows = {v.shape[0] for state in (checkpoint, *nested) if isinstance(state, dict) for k, v in state.items()
            if re.sub(r"^((module|_orig_mod)\.)+", "", k) == key and torch.is_tensor(v) and v.dim()}
    if rows and classes not in rows:
        fail(f"{path} was trained for {rows.pop()} classes but the data has {classes}; "
             "pass a checkpoint trained on this dataset")


@torch.no_grad()
def evaluate(model, loader, device, prepare):
    """Top-1/top-5 over the whole evaluation set (every rank's shard), in float32 whatever --amp trains in: a score must
    not depend on the speed flags (bf16 keeps 8 significant bits, enough to flip near-tied predictions)."""
    was_training = model.training
    model.eval()
    hits, n = torch.zeros(2, device=device, dtype=torch.float64), 0  # top-1 and top-5 hits, images
    with float32_scores():
        for images, labels in loader:
            n += len(labels)
            images, labels = prepare(images, labels)
            logits = model(images)
            correct = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            hits += torch.stack([correct[:, 0].sum(), correct.any(1).sum()])
    counts = torch.cat([hits, hits.new_tensor([n])])
    if dist.is_initialized():
        dist.all_reduce(counts)
    model.train(was_training)
    top1, top5, n = counts.tolist()
    return {"top1": 100 * top1 / max(n, 1), "top5": 100 * top5 / max(n, 1), "images": int(n)}


# ---- the run's bookkeeping: this task's ----
def evaluate_checkpoint(args, student, val_loader, device, prepare):
    """--evaluate: the top-1/top-5 of --resume's student (already loaded): printed, written to eval.json, returned."""
    metrics = {**evaluate(student, val_loader, device, prepare), "checkpoint": str(args.resume)}
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"{args.resume}: top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f} on {metrics['images']} images")
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        save_atomic(json.dumps(metrics, indent=2) + "\n", Path(args.out_dir) / "eval.json")
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics


def load_state(resumed, args, distiller, optimizer, scheduler, scaler):
    """(epochs done, best top-1, its epoch): a new run's, or those of the --resume checkpoint, whose distiller,
    optimizer, scheduler and scaler states are loaded (its student already is)."""
    if resumed is None:
        return 0, None, None
    try:
        if distiller is not None:
            distiller.load_state_dict(resumed["distiller"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        if resumed["scaler"]:  # a bf16 or float32 run saved a disabled scaler's {}: resuming it in fp16 starts afresh
            scaler.load_state_dict(resumed["scaler"])
        return resumed["epoch"], resumed["best"], resumed.get("best_epoch")
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        fail(f"{args.resume} is not a checkpoint of this run ({type(e).__name__}: {str(e).splitlines()[0]}); "
             "resume with the flags it was trained with")


def score_teacher(args, teacher, tag, published, val_loader, device, prepare):
    """The teacher's validation top-1 (None without one), printed with a warning when it is more than
    TEACHER_TOLERANCE off torchvision's published score: wrong data, or the wrong image size."""
    if teacher is None:
        return None
    metrics = evaluate(teacher.model, val_loader, device, prepare)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"teacher {args.teacher} ({tag}): top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f}")
        if published is not None and abs(metrics["top1"] - published) > TEACHER_TOLERANCE:
            print(f"warning: the teacher scores {metrics['top1']:.2f} top-1 where torchvision publishes "
                  f"{published:.2f}: check --data-dir (the full validation set, class folders named by wnid) and "
                  "--img-size 224")
    return metrics["top1"]


def write_summary(args, metrics, best, best_epoch, teacher_top1, teacher_tag, published, t_start, images_per_s,
                  world):
    """summary.json, the run in one record (returned, and what main returns), and the last line."""
    summary = {"metric": "top1", "best": best, "best_epoch": best_epoch, "last": metrics["top1"],
               "teacher": teacher_top1, "student_arch": args.student, "teacher_arch": args.teacher,
               "distill": args.distill, "wall_s": time.time() - t_start, "images_per_s": images_per_s,
               "peak_mem_mb": run_peak_mb(args.out_dir), "world_size": world, "versions": versions(),
               "last_top5": metrics["top5"], "teacher_weights": teacher_tag, "teacher_published": published}
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
