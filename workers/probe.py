"""What this box offers: resource classes, cores, memory, accelerators."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys

import psutil

from edgefleet.schemas import ResourceClass


def detect_gpus() -> list[str]:
    """Names of usable accelerators: NVIDIA via nvidia-smi, Apple silicon via Metal."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout
            return [line.strip() for line in out.splitlines() if line.strip()]
        except (subprocess.SubprocessError, OSError):
            return []
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return ["apple-metal"]
    return []


def detect_classes(force_gpu: bool = False) -> list[ResourceClass]:
    classes = [ResourceClass.cpu, ResourceClass.io]
    if force_gpu or detect_gpus():
        classes.append(ResourceClass.gpu)
    return classes


def cores() -> int:
    return psutil.cpu_count(logical=True) or 1


def memory() -> tuple[int, int]:
    vm = psutil.virtual_memory()
    return vm.total, vm.available
