"""Built-in `video` plugin: render a slideshow MP4 from photos with ffmpeg, and check the result."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from edgefleet.plugin_context import PluginContext
from edgefleet.pluginkit.actions import dispatch
from edgefleet.pluginkit.proc import kill_process, supervise

# Where to look when the sandbox's scrubbed environment has no useful PATH.
FALLBACK_PATH = "/usr/local/bin:/usr/bin:/bin"
POLL_S = 0.2
PROBE_TIMEOUT_S = 30


def run(ctx: PluginContext, action: str, args: dict[str, Any]) -> dict[str, Any]:
    """Entry point named in plugin.yaml."""
    return dispatch(ctx, action, args, plugin="video", actions={"slideshow": slideshow})


def find_binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=FALLBACK_PATH)


def _encoder(ffmpeg: str) -> tuple[str, list[str]]:
    """libx264 where this ffmpeg has it, else the always-built-in MPEG-4 part 2 encoder."""
    try:
        listed = subprocess.run(
            [ffmpeg, "-hide_banner", "-nostdin", "-encoders"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        listed = ""
    if re.search(r"^\s*V\S*\s+libx264\s", listed, re.MULTILINE):
        return "libx264", ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23"]
    return "mpeg4", ["-c:v", "mpeg4", "-q:v", "4"]


def build_command(
    ffmpeg: str,
    images: list[Path],
    frames_per_photo: int,
    fps: int,
    width: int,
    height: int,
    codec_args: list[str],
    progress: Path,
    target: Path,
) -> list[str]:
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-progress", str(progress)]
    chains = []
    for i, image in enumerate(images):
        # Each photo loops as a still; trim cuts it at exactly `frames_per_photo` frames.
        cmd += ["-loop", "1", "-framerate", str(fps), "-i", str(image)]
        chains.append(
            f"[{i}:v]trim=end_frame={frames_per_photo},setpts=PTS-STARTPTS,"
            f"scale={width}:{height}:force_original_aspect_ratio=decrease,"
            f"pad={width}:{height}:(ow-iw)/2:(oh-ih)/2:color=black,setsar=1,format=yuv420p[v{i}]"
        )
    labels = "".join(f"[v{i}]" for i in range(len(images)))
    graph = ";".join(chains) + f";{labels}concat=n={len(images)}:v=1:a=0[out]"
    cmd += [
        "-filter_complex",
        graph,
        "-map",
        "[out]",
        *codec_args,
        "-r",
        str(fps),
        "-pix_fmt",
        "yuv420p",
        "-threads",
        "2",
        "-movflags",
        "+faststart",
        "-f",
        "mp4",
        str(target),
    ]
    return cmd


def _out_time(progress: Path) -> float | None:
    try:
        text = progress.read_text(errors="replace")
    except OSError:
        return None
    found = re.findall(r"^out_time_(?:us|ms)=(\d+)$", text, re.MULTILINE)
    return int(found[-1]) / 1e6 if found else None  # both keys are microseconds in ffmpeg 5+


def _render(ctx: PluginContext, cmd: list[str], progress: Path, expected: float, log: Path) -> None:
    with open(log, "wb") as errors:
        # Same process group as this plugin: a sandbox that kills its group kills ffmpeg too.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)

        def report() -> None:
            done = _out_time(progress)
            if done is not None and expected > 0:
                ctx.progress(min(0.99, done / expected), f"rendered {done:.1f}/{expected:.1f} s")

        # No limit of its own: the subtask's deadline (seen as a cancel) bounds it.
        supervise(ctx, proc, stop=kill_process, poll=POLL_S, tick=report)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip()[-1500:]
        raise RuntimeError(f"ffmpeg exited with {proc.returncode}: {tail or 'no message'}")


def probe(path: Path) -> dict[str, Any]:
    """Duration, frames, size and codec of the video at `path`, read back from the file."""
    ffprobe = find_binary("ffprobe")
    if ffprobe:
        result = subprocess.run(
            [
                ffprobe,
                "-v",
                "error",
                "-select_streams",
                "v:0",
                "-show_entries",
                "format=duration:stream=codec_name,width,height,nb_frames",
                "-of",
                "json",
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"ffprobe cannot read {path.name}: {result.stderr.strip()[-500:]}")
        data = json.loads(result.stdout or "{}")
        streams = data.get("streams") or []
        if not streams or "duration" not in (data.get("format") or {}):
            raise RuntimeError(f"{path.name} has no video stream")
        stream = streams[0]
        frames = stream.get("nb_frames")
        return {
            "duration": float(data["format"]["duration"]),
            "frames": int(frames) if str(frames).isdigit() else None,
            "width": int(stream["width"]),
            "height": int(stream["height"]),
            "codec": stream.get("codec_name", "unknown"),
        }
    # No ffprobe: `ffmpeg -i` prints the container's duration and the stream's size and codec.
    ffmpeg = find_binary("ffmpeg") or "ffmpeg"
    text = subprocess.run(
        [ffmpeg, "-hide_banner", "-nostdin", "-i", str(path)],
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_S,
        check=False,
    ).stderr
    duration = re.search(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", text)
    video = re.search(r"Video: (\w+).*?, (\d{2,5})x(\d{2,5})", text)
    if not duration or not video:
        raise RuntimeError(f"ffmpeg cannot read {path.name} back as a video")
    hours, minutes, seconds = duration.groups()
    return {
        "duration": int(hours) * 3600 + int(minutes) * 60 + float(seconds),
        "frames": None,
        "width": int(video.group(2)),
        "height": int(video.group(3)),
        "codec": video.group(1),
    }


def slideshow(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    images = [ctx.input_path(str(p)) for p in args["images"]]
    if not images:
        raise ValueError("images: give at least one photo")
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise ValueError(f"images: {len(missing)} not found, e.g. {missing[0]!r}")
    seconds = float(args.get("seconds_per_photo", 1))
    fps = int(args.get("fps", 25))
    width, height = int(args.get("width", 640)), int(args.get("height", 480))
    if seconds <= 0 or width % 2 or height % 2:
        raise ValueError("seconds_per_photo must be > 0; width and height must be even")
    filename = str(args.get("filename", "slideshow.mp4"))
    frames_per_photo = max(1, round(seconds * fps))
    expected = len(images) * frames_per_photo / fps

    ffmpeg = find_binary("ffmpeg")
    if ffmpeg is None:
        raise RuntimeError("ffmpeg is not installed on this node")
    codec, codec_args = _encoder(ffmpeg)
    target = ctx.workspace_path(filename)
    partial = ctx.workspace_path(f".{filename}.part")
    progress = ctx.workspace_path(".ffmpeg-progress.txt")
    log = ctx.workspace_path(".ffmpeg-stderr.txt")
    cmd = build_command(ffmpeg, images, frames_per_photo, fps, width, height, codec_args, progress, partial)
    ctx.progress(0.0, f"rendering {len(images)} photos with {codec}")
    started = time.monotonic()
    _render(ctx, cmd, progress, expected, log)

    info = probe(partial)
    # One frame of slack per photo: containers round timestamps.
    if abs(info["duration"] - expected) > len(images) / fps + 0.05:
        raise RuntimeError(f"rendered video lasts {info['duration']:.3f} s, expected {expected:.3f} s")
    if (info["width"], info["height"]) != (width, height):
        raise RuntimeError(f"rendered video is {info['width']}x{info['height']}, expected {width}x{height}")
    os.replace(partial, target)
    ctx.progress(1.0, f"rendered {info['duration']:.1f} s")
    return {
        "path": str(target),
        "duration": round(info["duration"], 3),
        "expected_duration": round(expected, 3),
        "frames": info["frames"],
        "photos": len(images),
        "width": info["width"],
        "height": info["height"],
        "codec": info["codec"],
        "bytes": target.stat().st_size,
        "render_seconds": round(time.monotonic() - started, 2),
    }
