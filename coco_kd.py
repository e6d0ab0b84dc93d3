"""Projector-based feature distillation on COCO 2017 object detection, torchvision only.

The detection setting of "Understanding the Role of the Projector in Knowledge Distillation" (Miles &
Mikolajczyk, AAAI 2024), whose detection code was never released, on torchvision's Faster R-CNN: a
frozen COCO-trained teacher (default ``fasterrcnn_resnet50_fpn_v2``, 46.7 box AP) and a Faster R-CNN +
FPN student on a smaller backbone (default ResNet-18, ImageNet-initialised). At every FPN level the two
share (the same stride) the student map ``z_s`` is projected by a linear ``W_p`` at every position,
``z_s W_p`` and the teacher map ``z_t`` are batch-normalised per channel (no affine) and compared with
the soft maximum ``log sum |z_s W_p - z_t| ** alpha`` (alpha = 4). The levels are summed and added,
times ``--feat-weight`` (1: our choice, the paper's detection settings are unpublished), to
torchvision's four detection losses. The paper reports results on par with ReviewKD, whose rows are
quoted in the README (ResNet-101 -> ResNet-18, detectron2: 33.26 -> 36.75 AP).

Teacher and student see the same batch: the student's ``GeneralizedRCNNTransform`` runs once and its
``ImageList`` feeds both backbones; the detector's forward (transform -> backbone -> RPN -> RoI heads)
is written out below. The recipe is the 1x schedule (as the ReviewKD rows, detectron2's): 12 epochs,
x0.1 at epochs 8 and 11, SGD with momentum 0.9, lr 0.02 per 16 images, weight decay 1e-4, 2 images
per GPU, shorter side 800 (longer side at most 1333), horizontal flips; the rest as torchvision's
detection reference: IMAGENET1K_V1 backbones, aspect-ratio bins (factor 3), warm-up over min(1000,
steps per epoch - 1) iterations, and COCOeval (bbox) in float32, one image per batch.

    torchrun --nproc_per_node=8 coco_kd.py --data-dir data/coco               # 8 GPUs, 16 images/step
    python coco_kd.py --data-dir data/coco --batch-size 16                    # 1 GPU, the same recipe
    torchrun --nproc_per_node=8 coco_kd.py --data-dir data/coco --distill none   # the baseline row
    python coco_kd.py --dummy --epochs 1 --max-steps 20 --min-size 320 --max-size 512   # no files

Data: <data-dir>/annotations/instances_{train,val}2017.json and <data-dir>/{train,val}2017/*.jpg
(cocodataset.org). Students: resnet18/34/50 (ResNet FPN: levels '0'-'3' and 'pool' at strides 4-64,
all five distilled) and mobilenet_v3_large (torchvision's MobileNetV3 FPN: '0' and '1' both at stride
32, 'pool' at 64; each teacher level is distilled once: '1' against the teacher's '3', 'pool' against
'pool'). A run prints the teacher's val AP, then one line per --log-every steps (the four detection
losses, feat, lr, img/s, ETA) and the COCO AP of every epoch; it writes args.json, metrics.jsonl,
last.pt, best.pt and summary.json (headline: the last epoch's AP, as detection papers report) into --out-dir.
"""
import argparse
import contextlib
import datetime
import io
import json
import math
import os
import platform
import resource
import sys
import time
from collections import OrderedDict
from importlib import metadata

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torchvision.datasets import CocoDetection
from torchvision.io import ImageReadMode, decode_image
from torchvision.models import detection
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from common import FeatureDistiller, projector_spectrum

try:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
except ImportError:
    COCO = None

STEM = "coco_kd"
STUDENTS = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_large")
COCO_TEACHERS = {"fasterrcnn_resnet50_fpn_v2": 46.7, "fasterrcnn_resnet50_fpn": 37.0}  # published box AP
NUM_CLASSES = 91  # torchvision's COCO heads: background + category ids 1..90 used directly as labels
DET_LOSSES = {"loss_classifier": "cls", "loss_box_reg": "box", "loss_objectness": "obj", "loss_rpn_box_reg": "rpn"}
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LAYOUT = ("expected <data-dir>/annotations/instances_{train,val}2017.json and <data-dir>/{train,val}2017/ "
          "with the images (from cocodataset.org), or pass --dummy")


def fail(msg):
    """Bad input: one line on stderr, exit code 2, before anything is written."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{STEM}: error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="data/coco",
                   help="COCO 2017 root: annotations/instances_{train,val}2017.json, train2017/, val2017/")
    g.add_argument("--dummy", action="store_true",
                   help="random images with random boxes: the whole pipeline with no files, no downloads and a "
                        "random teacher")
    g.add_argument("--min-size", type=int, default=800, help="resize the shorter image side to this")
    g.add_argument("--max-size", type=int, default=1333, help="... unless the longer side would exceed this")
    g = p.add_argument_group("models")
    g.add_argument("--student", default="resnet18",
                   help=f"student backbone of a Faster R-CNN + FPN: {', '.join(STUDENTS)}")
    g.add_argument("--no-pretrained-backbone", action="store_true",
                   help="random student backbone instead of torchvision's ImageNet weights (IMAGENET1K_V1, as its "
                        "detection builders; implied by --dummy)")
    g.add_argument("--teacher", default="fasterrcnn_resnet50_fpn_v2",
                   help=f"teacher: {', '.join(COCO_TEACHERS)} (torchvision's COCO weights), or a student layout "
                        f"({', '.join(STUDENTS)}) with --teacher-ckpt")
    g.add_argument("--teacher-ckpt",
                   help="teacher weights (a state dict, or a checkpoint of this script) instead of torchvision's")
    g.add_argument("--teacher-eval-images", type=int, default=0,
                   help="check the teacher on the first N val images only (0: all)")
    g = p.add_argument_group("distillation")
    g.add_argument("--distill", default="srd", choices=("none", "srd"),
                   help="none: detection losses only (the baseline student, or training a teacher); srd: + the "
                        "feature term at every shared FPN level")
    g.add_argument("--feat-weight", type=float, default=1.0,
                   help="weight of the feature term summed over FPN levels (our choice: the paper's detection "
                        "settings were not published)")
    g.add_argument("--alpha", type=float, default=4.0, help="alpha of the soft maximum log sum |z_s W_p - z_t|^alpha")
    g.add_argument("--norm", default="bn", choices=("bn", "ln", "l2", "none"),
                   help="normalisation of z_s W_p and z_t, per channel over batch and positions")
    g.add_argument("--projector", default="linear", choices=("linear", "mlp", "none"),
                   help="W_p, applied at every position (a 1x1 convolution)")
    g.add_argument("--distance", default="logsum", choices=("logsum", "corr"),
                   help="the log-sum soft maximum (the paper) or the correlation variant of the official DeiT code")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=12, help="epochs (the 1x schedule)")
    g.add_argument("--batch-size", type=int, default=2, help="images per process")
    g.add_argument("--lr", type=float, default=0.02,
                   help="SGD learning rate for a global batch of 16 images, scaled linearly to the actual one")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--wd", type=float, default=1e-4, help="weight decay")
    g.add_argument("--lr-steps", type=int, nargs="+", default=[8, 11], help="multiply the lr by 0.1 at these epochs")
    g.add_argument("--warmup-iters", type=int, default=1000,
                   help="linear warm-up iterations from lr/1000, at most one epoch's steps minus one (as torchvision)")
    g = p.add_argument_group("system")
    g.add_argument("--amp", choices=("off", "bf16", "fp16"),
                   help="autocast of the training backbones (default: bf16 on CUDA, off on CPU); the heads and every "
                        "evaluation stay float32")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format for the backbones")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the backbones (the heads have data-dependent shapes)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (under torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--workers", type=int, default=4, help="data-loading processes per process")
    g.add_argument("--seed", type=int, default=0,
                   help="seed: batches, flips and RPN/RoI sampling are functions of (seed, epoch, rank)")
    g.add_argument("--sync-bn", action="store_true",
                   help="SyncBatchNorm across processes (the projectors' BN, and the student's when not frozen)")
    g = p.add_argument_group("outputs")
    g.add_argument("--log-every", type=int, default=20, help="print a progress line every N steps")
    g.add_argument("--max-steps", type=int, default=0,
                   help="cap the steps per epoch (smoke tests, benchmarks); 0: no cap")
    g.add_argument("--score-thresh", type=float, default=0.05,
                   help="keep detections scoring above this (torchvision's default)")
    g.add_argument("--out-dir", help="outputs (default: runs/coco_kd-<student>-<distill>, or the folder of --resume)")
    g.add_argument("--resume", metavar="PATH", help="continue the run of this checkpoint (its last.pt)")
    g.add_argument("--evaluate", action="store_true",
                   help="evaluate the student of --resume PATH on val, write eval.json, exit")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Data: COCO boxes as Faster R-CNN targets, aspect-ratio grouped batches, COCOeval

class CocoBoxes(CocoDetection):
    """COCO images (uint8, CHW) with targets ``{boxes (xyxy), labels, image_id}``.

    Crowd boxes and boxes without area after clipping are dropped; for training, images left without
    a box are skipped. Items are addressed by ``(index, flip)``, so the sampler decides the flips.
    """

    def __init__(self, root, ann_file, train):
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            super().__init__(root, ann_file)
        if train:
            self.ids = [i for i in self.ids if len(self.target(i)["boxes"])]
        self.aspect = [self.coco.imgs[i]["height"] / self.coco.imgs[i]["width"] for i in self.ids]

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
    """Random images (landscape and portrait) with 1-5 random boxes each, reproducible per index,
    and a matching pycocotools ground truth for the evaluation code."""

    def __init__(self, n, size, offset):
        self.ids = list(range(offset, offset + n))
        self.shapes = [(size, size * 4 // 3) if i % 2 else (size * 4 // 3, size) for i in self.ids]
        self.aspect = [h / w for h, w in self.shapes]
        self.targets = [self.make_target(i) for i in range(n)]
        boxes = [(t["image_id"], int(c), x0, y0, x1 - x0, y1 - y0)
                 for t in self.targets for (x0, y0, x1, y1), c in zip(t["boxes"].tolist(), t["labels"])]
        self.coco = COCO()
        self.coco.dataset = {
            "images": [{"id": i, "height": h, "width": w} for i, (h, w) in zip(self.ids, self.shapes)],
            "categories": [{"id": c} for c in range(1, NUM_CLASSES)],
            "annotations": [{"id": k, "image_id": i, "category_id": c, "bbox": [x, y, w, h], "area": w * h,
                             "iscrowd": 0} for k, (i, c, x, y, w, h) in enumerate(boxes, 1)]}
        with contextlib.redirect_stdout(io.StringIO()):
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


def coco_split(data_dir, split, train):
    """Load one split, or fail with what is wrong and the expected layout."""
    ann_file = os.path.join(data_dir, "annotations", f"instances_{split}.json")
    image_dir = os.path.join(data_dir, split)
    if not os.path.isfile(ann_file):
        fail(f"missing annotation file {ann_file}; {LAYOUT}")
    if not os.path.isdir(image_dir):
        fail(f"missing image folder {image_dir}; {LAYOUT}")
    try:
        ds = CocoBoxes(image_dir, ann_file, train)
        files = [image["file_name"] for image in ds.coco.imgs.values()]
        categories = [c["id"] for c in ds.coco.dataset.get("categories", [])]
    except Exception as e:  # not JSON, or JSON without the COCO fields
        fail(f"ill-formed annotation file {ann_file} ({type(e).__name__}: {' '.join(str(e).split())[:100]}); {LAYOUT}")
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
             f"torchvision's heads), got {min(categories, default=None)}..{max(categories, default=None)}; {LAYOUT}")
    return ds


def train_batches(aspect, batch_size, seed, epoch, rank, world):
    """This rank's batches for one epoch, grouped by aspect ratio (height / width) in the bins of
    torchvision's reference (``create_aspect_ratio_groups``, factor 3: edges 2 ** linspace(-1, 1, 7)), so
    that padding a batch to one size wastes little. Order and flips are functions of (seed, epoch), so a
    resumed run sees the same batches; every rank gets the same number of batches."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(aspect), generator=g).tolist()
    flips = (torch.rand(len(aspect), generator=g) < 0.5).tolist()
    edges = 2 ** torch.linspace(-1, 1, 7, dtype=torch.float64)  # bisect_right into these, as the reference
    bins, batches = torch.bucketize(torch.tensor(aspect, dtype=torch.float64), edges, right=True).tolist(), []
    for b in sorted(set(bins)):
        group = [(i, flips[i]) for i in order if bins[i] == b]
        batches += [group[j:j + batch_size] for j in range(0, len(group), batch_size)]
    batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
    per_rank = len(batches) // world  # the few batches left over differ every epoch
    return batches[rank * per_rank:(rank + 1) * per_rank]


def collate(batch):
    return tuple(zip(*batch))


def loader(dataset, batches, args, device):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=args.workers,
                                       pin_memory=device.type == "cuda")


def coco_metrics(coco_gt, detections, image_ids):
    """COCOeval bbox over exactly ``image_ids``; -1 (no ground truth in an area range) becomes None."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections) if detections else COCO()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return {k: (None if v < 0 else round(float(v), 5)) for k, v in zip(METRICS, ev.stats)}


# ----------------------------------------------------------------------------------------------
# Models: torchvision Faster R-CNNs, their forward written out, and the distillers

def faster_rcnn(name, pretrained_backbone, args):
    """A Faster R-CNN + FPN on a student backbone. As in torchvision's builders, a pretrained backbone
    keeps its BN frozen and its stem and first stage fixed; a random one trains everything."""
    weights = "IMAGENET1K_V1" if pretrained_backbone else None  # as torchvision's detection builders (not V2)
    if name == "mobilenet_v3_large":
        return detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=weights,
                                                           **detector_kwargs(args))
    backbone = resnet_fpn_backbone(backbone_name=name, weights=weights, trainable_layers=3 if weights else 5,
                                   norm_layer=FrozenBatchNorm2d if weights else nn.BatchNorm2d)
    return detection.FasterRCNN(backbone, **detector_kwargs(args))


def detector_kwargs(args):
    return dict(num_classes=NUM_CLASSES, min_size=args.min_size, max_size=args.max_size,
                box_score_thresh=args.score_thresh)


def build_teacher(args):
    """The frozen teacher and where its weights come from."""
    random_init = args.dummy and not args.teacher_ckpt
    if args.teacher in COCO_TEACHERS:
        try:
            weights = None if args.teacher_ckpt or random_init else "DEFAULT"
            teacher = getattr(detection, args.teacher)(weights=weights, weights_backbone=None, **detector_kwargs(args))
        except Exception as e:  # offline
            fail(f"could not load torchvision's COCO weights of {args.teacher} ({type(e).__name__}); "
                 "pass --teacher-ckpt PATH")
    elif args.teacher_ckpt or random_init:
        teacher = faster_rcnn(args.teacher, False, args)
    else:
        fail(f"--teacher {args.teacher} has no COCO weights in torchvision; pass --teacher-ckpt PATH "
             "(e.g. the best.pt of a --distill none run)")
    if args.teacher_ckpt:
        load_weights(teacher, args.teacher_ckpt, "teacher")
    source = ("RANDOM weights (--dummy without --teacher-ckpt)" if random_init
              else args.teacher_ckpt or "torchvision's COCO weights")
    return teacher.eval().requires_grad_(False), source


def load_weights(model, path, what):
    """Strict load of an untrusted file (CONVENTIONS §5): a bare state dict or one under
    model/state_dict/student, ``module.``/``_orig_mod.`` prefixes stripped. Returns what the file holds."""
    if not os.path.isfile(path):
        fail(f"{what} checkpoint {path} does not exist; pass an existing file")
    try:
        state = loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read {what} checkpoint {path} ({type(e).__name__}); pass a file written by torch.save")
    for key in ("model", "state_dict", "student"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        fail(f"{what} checkpoint {path} holds no state dict; pass a state dict or a checkpoint of this script")
    state = {strip_prefixes(k): v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes differ (another layout or class count)
        fail(f"{what} checkpoint {path} does not fit: {' '.join(str(e).split())[:300]}; check --{what}")
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # absent from frozen-BN layouts
    if missing or unexpected:
        fail(f"{what} checkpoint {path} does not fit --{what}: missing {missing[:3]}, unexpected {unexpected[:3]}; "
             f"check --{what}")
    return loaded


def strip_prefixes(key):
    """``module.`` (DDP) and ``_orig_mod.`` (torch.compile) in front of the model's own key names."""
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def fpn_features(backbone, x, amp_dtype):
    """The FPN maps, in float32. Backbone and FPN (nearly all the FLOPs) run under autocast; the RPN
    and RoI heads stay in float32, as bf16's 8-bit mantissa would move box corners near x = 1000 by
    up to 4 px."""
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return OrderedDict((k, v.float()) for k, v in backbone(x).items())


def transform(model, images, targets=None, channels_last=False):
    """Normalise, resize and pad: the ImageList that both backbones see."""
    batch, targets = model.transform(images, targets)
    if channels_last:
        batch.tensors = batch.tensors.contiguous(memory_format=torch.channels_last)
    return batch, targets


@torch.no_grad()
def detect(model, images, channels_last):
    """Inference, GeneralizedRCNN.forward written out: boxes in the original images' pixels. In float32
    whatever --amp trains in, so that a score never depends on --amp."""
    sizes = [tuple(image.shape[-2:]) for image in images]
    batch, _ = transform(model, images, channels_last=channels_last)
    features = fpn_features(model.backbone, batch.tensors, None)
    proposals, _ = model.rpn(batch, features)
    detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
    return model.transform.postprocess(detections, batch.image_sizes, sizes)


@torch.no_grad()
def match_levels(student, teacher):
    """Pair FPN levels by stride, each teacher level once: {student: teacher}, and the levels' shapes.
    ResNet FPNs have '0'-'3' and 'pool' at strides 4-64; torchvision's MobileNetV3 FPN has '0' and '1'
    both at stride 32 and 'pool' at 64: its deeper '1' meets the teacher's '3' (the top of both pyramids)."""
    x, shapes = torch.zeros(1, 3, 256, 256), []
    for model in (student, teacher):
        mode = model.training
        shapes.append({k: tuple(v.shape[1:]) for k, v in model.eval().backbone(x).items()})
        model.train(mode)
    by_size = {s[1:]: ks for ks, s in shapes[0].items()}  # map size (stride) -> the student's last level of that size
    return {by_size[t[1:]]: kt for kt, t in shapes[1].items() if t[1:] in by_size}, shapes


class DistilledDetector(nn.Module):
    """What DDP wraps: the student's training forward and the distillers, so the projectors W_p are
    averaged like the student's weights and stay identical on every rank."""

    def __init__(self, student, distillers, levels, amp_dtype):
        super().__init__()
        self.student, self.distillers, self.levels, self.amp_dtype = student, distillers, levels, amp_dtype

    def forward(self, batch, targets, features_t=None):
        features = fpn_features(self.student.backbone, batch.tensors, self.amp_dtype)
        proposals, rpn_losses = self.student.rpn(batch, features, targets)
        _, roi_losses = self.student.roi_heads(features, proposals, batch.image_sizes, targets)
        losses = {**rpn_losses, **roi_losses}
        if features_t is not None:  # d(BN(z_s W_p), BN(z_t)) at every shared level, summed
            losses["loss_feat"] = sum(self.distillers[ks](features[ks], features_t[kt])
                                      for ks, kt in self.levels.items())
        return losses


@torch.no_grad()
def evaluate(model, dataset, batches, args, device, world):
    """COCO bbox AP of ``model`` on this rank's ``batches``; detections of all ranks are gathered, so
    every val image is counted exactly once. Returns the metrics and the number of images."""
    mode = model.training
    model.eval()
    detections, image_ids = [], []
    for images, targets in loader(dataset, batches, args, device):
        images = [image.to(device, non_blocking=True).float().div_(255) for image in images]
        for target, det in zip(targets, detect(model, images, args.channels_last)):
            boxes = det["boxes"].cpu()
            boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
            image_ids.append(target["image_id"])
            detections += [{"image_id": target["image_id"], "category_id": c, "bbox": [round(v, 2) for v in b],
                            "score": round(s, 4)}
                           for b, c, s in zip(boxes.tolist(), det["labels"].tolist(), det["scores"].tolist())]
    model.train(mode)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (detections, image_ids))
        detections, image_ids = [d for g in gathered for d in g[0]], [i for g in gathered for i in g[1]]
    metrics = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        metrics = coco_metrics(dataset.coco, detections, image_ids)
    if world > 1:
        box = [metrics]
        dist.broadcast_object_list(box)
        metrics = box[0]
    return metrics, len(image_ids)


def fmt(metrics):
    return " ".join(f"{k} {'-' if v is None else f'{100 * v:.1f}'}" for k, v in metrics.items())


def n_params(module):
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def version(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def peak_mem_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save(obj, path):
    """Atomic: a reader never sees a half-written checkpoint."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    # ---- validation: whatever can be wrong is found before anything is written
    if COCO is None:
        fail("pycocotools is not installed; pip install pycocotools")
    for flag, name, choices in (("--student", args.student, STUDENTS),
                                ("--teacher", args.teacher, (*COCO_TEACHERS, *STUDENTS))):
        if name not in choices:
            fail(f"unknown {flag} {name!r}; choose from {', '.join(choices)}")
    if args.evaluate and not args.resume:
        fail("--evaluate needs --resume PATH, the checkpoint whose student to evaluate")
    if args.resume and not os.path.isfile(args.resume):
        fail(f"--resume file {args.resume} does not exist; pass the last.pt of a run")
    default_out = os.path.dirname(args.resume) if args.resume else f"runs/{STEM}-{args.student}-{args.distill}"
    args.out_dir = args.out_dir or default_out
    if not args.resume and any(os.path.exists(os.path.join(args.out_dir, f)) for f in ("args.json", "last.pt")):
        fail(f"{args.out_dir} already holds a run; pass --resume {args.out_dir}/last.pt to continue it, "
             "or choose another --out-dir")
    device_type = torch.device(args.device).type
    args.amp = args.amp or ("bf16" if device_type == "cuda" else "off")
    if args.amp == "fp16" and device_type != "cuda":
        fail("--amp fp16 needs CUDA (its GradScaler); use --amp bf16 or off on CPU")
    if args.sync_bn and device_type != "cuda":
        fail("--sync-bn needs CUDA (SyncBatchNorm runs on GPUs only); leave it out on CPU")
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]

    # ---- distributed set-up: torchrun sets RANK; without it, the same code in one process
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if device_type == "cuda" else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    is_main = rank == 0
    torch.manual_seed(args.seed + rank)

    # ---- data: aspect-ratio grouped training batches; val sharded by rank, nothing dropped
    if args.dummy:
        train_set, val_set = DummyBoxes(256, args.min_size, 1), DummyBoxes(7, args.min_size, 10_001)
    else:
        train_set = coco_split(args.data_dir, "train2017", train=True)
        val_set = coco_split(args.data_dir, "val2017", train=False)
    steps = len(train_batches(train_set.aspect, args.batch_size, args.seed, 0, rank, world))
    steps = min(steps, args.max_steps) if args.max_steps else steps
    if steps == 0:
        fail(f"{len(train_set)} training images make no batch for each of {world} processes; "
             "use a smaller --batch-size")
    # one val image per batch, as torchvision's reference: padding to a batch's size never moves a prediction
    val_batches = [[(i, False)] for i in range(rank, len(val_set), world)]

    # ---- student, frozen teacher, and one FeatureDistiller per FPN level the two share
    try:
        student = faster_rcnn(args.student, not (args.no_pretrained_backbone or args.dummy or args.evaluate), args)
    except Exception as e:  # offline: torchvision could not fetch the ImageNet weights
        fail(f"could not load the ImageNet weights of the {args.student} backbone ({type(e).__name__}); "
             "connect once so that torchvision caches them, or pass --no-pretrained-backbone")
    teacher, levels, distillers = None, {}, nn.ModuleDict()
    if args.distill == "srd" and not args.evaluate:
        teacher, teacher_source = build_teacher(args)
        levels, shapes = match_levels(student, teacher)
        distillers = nn.ModuleDict({  # per-rank statistics: the FPN maps of a global batch are too large to gather
            ks: FeatureDistiller(shapes[0][ks][0], shapes[1][kt][0], args.projector, args.norm, args.distance,
                                 args.alpha, global_batch=False) for ks, kt in levels.items()})
    checkpoint = load_weights(student, args.resume, "student") if args.resume else None
    if checkpoint is not None and not args.evaluate:
        if "optimizer" not in checkpoint:
            fail(f"--resume {args.resume} holds weights only; pass the last.pt of a run of this script")
        try:
            distillers.load_state_dict(checkpoint["distiller"] or {})
        except RuntimeError:
            fail(f"the distillers in {args.resume} do not fit --distill {args.distill} --student {args.student} "
                 f"--teacher {args.teacher}; resume with the flags of the run")
    for detector in filter(None, (student, teacher)):
        detector.to(device)
        if args.channels_last:
            detector.backbone.to(memory_format=torch.channels_last)
        if args.compile:
            detector.backbone.compile()
    distillers.to(device)

    if args.evaluate:
        metrics, n = evaluate(student, val_set, val_batches, args, device, world)
        if is_main:
            print(f"{args.resume} (epoch {checkpoint.get('epoch')}): {fmt(metrics)} on {n} val images")
            os.makedirs(args.out_dir, exist_ok=True)
            write_json(os.path.join(args.out_dir, "eval.json"), {**metrics, "images": n, "checkpoint": args.resume})
        if distributed:
            dist.destroy_process_group()
        return metrics

    # ---- optimisation: SGD on the student and the projectors W_p; linear warm-up, x0.1 at --lr-steps
    global_batch = args.batch_size * world
    lr = args.lr * global_batch / 16
    wrapper = DistilledDetector(student, distillers, levels, amp_dtype)
    if distributed and args.sync_bn:
        wrapper = nn.SyncBatchNorm.convert_sync_batchnorm(wrapper)
    model = wrapper
    if distributed:
        model = DistributedDataParallel(wrapper, device_ids=[local_rank] if device.type == "cuda" else None)
    params = [p for p in wrapper.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.wd)

    warmup_iters = min(args.warmup_iters, steps - 1)  # at most one epoch minus one step, as torchvision's engine.py

    def lr_factor(it):  # it: optimizer steps taken so far
        warmup = min(1.0, 0.001 + 0.999 * it / warmup_iters) if warmup_iters else 1.0
        return warmup * 0.1 ** sum(it // steps >= m for m in args.lr_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16")
    start_epoch, best, best_epoch = 0, None, None
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, best, best_epoch = checkpoint["epoch"], checkpoint["best"], checkpoint["best_epoch"]

    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
    if is_main:
        os.makedirs(args.out_dir, exist_ok=True)
        write_json(os.path.join(args.out_dir, "args.json"), vars(args))
        if checkpoint is not None and os.path.exists(metrics_path):  # drop records of epochs after the checkpoint
            with open(metrics_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["epoch"] <= start_epoch]
            with open(metrics_path, "w") as f:
                f.writelines(kept)
        print(f"args: {json.dumps(vars(args))}")
        print(f"world size {world} | device {device} | amp {args.amp} | global batch {global_batch} | lr {lr:g} | "
              f"{steps} steps/epoch | {len(train_set)} train / {len(val_set)} val images")
        sizes = f" | distillers {n_params(distillers) / 1e6:.3f}M | teacher {n_params(teacher) / 1e6:.2f}M"
        print(f"params: student {n_params(student) / 1e6:.2f}M{sizes if teacher else ''}")
        if teacher is not None:
            print(f"teacher {args.teacher} with {teacher_source}; distilled FPN levels (student: teacher) {levels}")

    teacher_metrics = None
    if teacher is not None:  # a wrong checkpoint or pre-processing shows here, before any training
        n_check = args.teacher_eval_images or len(val_set)
        check_batches = [batch for batch in val_batches if batch[0][0] < n_check]
        teacher_metrics, n = evaluate(teacher, val_set, check_batches, args, device, world)
        published = COCO_TEACHERS.get(args.teacher) if teacher_source.startswith("torchvision") else None
        if is_main:
            print(f"teacher val: {fmt(teacher_metrics)} on {n} images")
            if published and abs(100 * teacher_metrics["AP"] - published) > 2:
                print(f"warning: {args.teacher} scores AP {100 * teacher_metrics['AP']:.1f} on {n} val images, "
                      f"published {published} on all 5,000; check --data-dir and --min-size/--max-size (800/1333)")

    # ---- training
    total_steps, done_steps, t_train, epoch_ips, last = (args.epochs - start_epoch) * steps, 0, 0.0, [], None
    for epoch in range(start_epoch, args.epochs):
        torch.manual_seed(args.seed * 1_000_000 + epoch * 1000 + rank)  # RPN/RoI sampling: f(seed, epoch, rank)
        batches = train_batches(train_set.aspect, args.batch_size, args.seed, epoch, rank, world)[:steps]
        log_sums = torch.zeros(len(DET_LOSSES) + 1, device=device)  # the detection terms and feat, on device
        log_steps, log_images, data_time, epoch_sums, epoch_images = 0, 0, 0.0, [0.0] * len(log_sums), 0
        t_epoch = t_log = t_data = time.time()
        for step, (images, targets) in enumerate(loader(train_set, batches, args, device), 1):
            data_time += time.time() - t_data
            images = [image.to(device, non_blocking=True).float().div_(255) for image in images]
            targets = [{k: t[k].to(device, non_blocking=True) for k in ("boxes", "labels")} for t in targets]
            batch, targets = transform(student, images, targets, args.channels_last)  # once, for both backbones
            features_t = None
            if teacher is not None:
                with torch.no_grad():
                    features_t = fpn_features(teacher.backbone, batch.tensors, amp_dtype)
            losses = model(batch, targets, features_t)
            loss_feat = losses["loss_feat"] if teacher is not None else torch.zeros((), device=device)
            loss = sum(losses[k] for k in DET_LOSSES) + args.feat_weight * loss_feat
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            log_sums += torch.stack([*(losses[k].detach() for k in DET_LOSSES), loss_feat.detach()])
            log_steps, log_images = log_steps + 1, log_images + len(images)
            if step % args.log_every == 0 or step == steps:  # the only host-device syncs of the loop
                stats = torch.cat([log_sums, log_sums.new_tensor([log_images, log_steps])])
                if distributed:
                    dist.all_reduce(stats)
                *sums, n_images, n_steps = stats.tolist()
                mean = [v / n_steps for v in sums]
                if not all(map(math.isfinite, mean)):
                    if is_main:
                        terms = " ".join(f"{k} {v}" for k, v in zip([*DET_LOSSES, "loss_feat"], mean))
                        print(f"{STEM}: non-finite loss at epoch {epoch + 1} step {step}: {terms}; "
                              "lower --lr or --feat-weight", file=sys.stderr)
                    sys.exit(3)
                now = time.time()
                done_steps, t_train = done_steps + log_steps, t_train + now - t_log
                if is_main:
                    eta = datetime.timedelta(seconds=round(t_train / done_steps * (total_steps - done_steps)))
                    det = " ".join(f"{short} {v:.3f}" for short, v in zip(DET_LOSSES.values(), mean))
                    feat = f" feat {mean[-1]:.3f}" if teacher is not None else ""
                    ips = n_images / (now - t_log)
                    print(f"epoch {epoch + 1}/{args.epochs} step {step}/{steps} | det {sum(mean[:-1]):.3f} ({det})"
                          f"{feat} | lr {optimizer.param_groups[0]['lr']:.4g} | {ips:.2f} img/s"
                          f" | data {1000 * data_time / log_steps:.1f} ms/step | eta {eta}")
                epoch_sums, epoch_images = [a + b for a, b in zip(epoch_sums, sums)], epoch_images + n_images
                log_sums.zero_()
                log_steps, log_images, data_time, t_log = 0, 0, 0.0, now
            t_data = time.time()
        epoch_s = time.time() - t_epoch
        epoch_ips.append(epoch_images / epoch_s)

        # ---- evaluation, checkpoint, records
        metrics, n_val = evaluate(student, val_set, val_batches, args, device, world)
        last = metrics["AP"]
        if best is None or last > best:
            best, best_epoch = last, epoch + 1
        if is_main:
            ckpt = {"student": student.state_dict(), "distiller": distillers.state_dict() if teacher else None,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "epoch": epoch + 1, "best": best, "best_epoch": best_epoch,
                    "args": vars(args)}
            save(ckpt, os.path.join(args.out_dir, "last.pt"))
            if best_epoch == epoch + 1:
                save(ckpt, os.path.join(args.out_dir, "best.pt"))
            mean = [v / (steps * world) for v in epoch_sums]
            spectra = {ks: projector_spectrum(d) for ks, d in distillers.items()}
            record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "loss_det": sum(mean[:-1]),
                      **dict(zip(DET_LOSSES, mean)), "loss_kd": None, "loss_feat": mean[-1] if teacher else None,
                      **metrics, "eval_images": n_val, "images_per_s": epoch_ips[-1], "epoch_s": epoch_s,
                      "peak_mem_mb": peak_mem_mb(device),
                      "projector_sv": {ks: sv if sv is None else {"max": sv.max().item(), "min": sv.min().item(),
                                                                  "mean": sv.mean().item()}
                                       for ks, sv in spectra.items()} if teacher else None}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"epoch {epoch + 1}/{args.epochs} val: {fmt(metrics)} on {n_val} images | best AP {100 * best:.1f} "
                  f"(epoch {best_epoch}) | {epoch_s:.0f} s | peak {record['peak_mem_mb']:.0f} MB")

    if is_main:  # the headline is the last epoch's AP, as detection papers report; the best epoch is a diagnostic
        write_json(os.path.join(args.out_dir, "summary.json"), {
            "metric": "AP", "headline": "last", "last": last, "best": best, "best_epoch": best_epoch,
            "teacher": teacher_metrics["AP"] if teacher_metrics else None, "teacher_metrics": teacher_metrics,
            "wall_s": time.time() - t_start, "images_per_s": sum(epoch_ips) / len(epoch_ips) if epoch_ips else None,
            "peak_mem_mb": peak_mem_mb(device), "world_size": world, "levels": levels,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "timm": version("timm"), "cuda": torch.version.cuda}})
        print(f"done: AP {last} after the last epoch (the headline); best AP {best} (epoch {best_epoch}, a diagnostic)")
    if distributed:
        dist.destroy_process_group()
    return last


if __name__ == "__main__":
    main()
