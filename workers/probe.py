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
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            return [line.strip() for line in out.splitlines() if line.strip()]
        except (subprocess.SubprocessError, OSError):
            return []
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return ["apple-metal"]
    return []


def gpu_usage() -> list[dict[str, float | str]]:
    """Per-GPU utilisation and memory from nvidia-smi; empty where there is none."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,utilization.gpu,memory.used,memory.total",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    usage: list[dict[str, float | str]] = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            usage.append(
                {
                    "name": parts[0],
                    "utilization_percent": float(parts[1]),
                    "memory_used_mb": float(parts[2]),
                    "memory_total_mb": float(parts[3]),
                }
            )
        except ValueError:
            continue
    return usage


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
