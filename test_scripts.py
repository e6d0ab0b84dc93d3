"""End-to-end tests of the four scripts, run as a user runs them: as subprocesses, on tiny data that
each test writes in the real on-disk format, on ``--dummy`` data, resumed, under a 2-process
``torchrun`` on CPU (gloo), and on bad input. Nothing is downloaded.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
# One thread per process: the tests run on small CPUs, and torchrun starts two processes.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}


def run_script(script, *args, timeout=300):
    """Run ``python SCRIPT ARGS`` from the repository root; return the CompletedProcess."""
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def run_torchrun(script, *args, nproc=2, timeout=300):
    """Run ``torchrun --nproc_per_node=NPROC SCRIPT ARGS`` on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={port}", str(ROOT / script), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def check_ok(result):
    """Assert the run succeeded, showing its output when it did not."""
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
    return result


def check_bad_input(result, script, out_dir, *words):
    """CONVENTIONS §6: exit code 2, one line on stderr that starts with the script's name and says
    what is wrong (it contains each of ``words``), no traceback, nothing written."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(Path(script).stem) or lines[0].startswith(script), lines[0]
    assert "Traceback" not in result.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    assert not Path(out_dir).exists() or not any(Path(out_dir).iterdir()), list(Path(out_dir).iterdir())


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# cifar100_kd.py
# <!-- tests: cifar100 -->


# ---------------------------------------------------------------------------------------------
# imagenet_kd.py
# <!-- tests: imagenet -->


# ---------------------------------------------------------------------------------------------
# deit_kd.py
# <!-- tests: deit -->


# ---------------------------------------------------------------------------------------------
# coco_kd.py
# <!-- tests: coco -->
