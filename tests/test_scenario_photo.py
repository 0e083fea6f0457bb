"""Scenario 1, the photo pipeline: generated photos with real EXIF, real router, workers, ffmpeg.

`photo-pipeline` = photo.classify -> photo.resize -> photo_rank.best_shots -> video.slideshow.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("PIL", reason="the photo plugins need Pillow (pip install 'Pillow>=10')")
if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
    pytest.skip("the video plugin needs ffmpeg and ffprobe (Debian package ffmpeg)", allow_module_level=True)

from PIL import Image, ImageStat

from edgefleet.plugin_catalog import PluginCatalog, builtin_plugin_dir
from edgefleet.plugin_context import PluginContext, SubtaskCancelled
from tests.conftest import Cluster, wait_until
from tests.photo_fixtures import MARKER, PhotoSpec, expected_resized_size, make_photos


def steps_of(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {st["id"]: st for st in status["subtasks"]}


def ffprobe(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "format=duration,format_name:stream=codec_name,width,height,nb_frames",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return json.loads(out)


def corner_colour(path: Path, fraction: float = 0.08) -> tuple[float, ...]:
    """Mean RGB of a small square at the displayed top-left corner of an image file."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    side = max(2, int(min(rgb.size) * fraction))
    return tuple(ImageStat.Stat(rgb.crop((1, 1, 1 + side, 1 + side))).mean)


def is_marker(colour: tuple[float, ...]) -> bool:
    return all(abs(c - m) < 70 for c, m in zip(colour, MARKER, strict=False))


def start_cluster(cluster_factory: Callable[..., Cluster], *nodes: str, classes: str) -> Cluster:
    cluster = cluster_factory()
    # The photo plugin reads only folders an operator granted: the tests' photos live here.
    cluster.env_overrides["EDGEFLEET_PLUGIN_READ_PATHS"] = json.dumps({"photo": [str(cluster.workdir / "photos")]})
    cluster.start_router()
    for name in nodes:
        cluster.start_node(name, classes=classes)
    cluster.wait_nodes_ready(*nodes)
    return cluster


# --- end to end ----------------------------------------------------------------------------------


def test_photo_pipeline_end_to_end(cluster_factory: Callable[..., Cluster], tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    specs = make_photos(folder, 30)
    (folder / "notes.txt").write_text("not a photo: skipped\n")
    (folder / ".hidden.jpg").write_bytes(b"hidden files are skipped")
    (folder / "day-a" / "broken.jpg").write_bytes(b"this is not a JPEG")
    by_name = {s.name: s for s in specs}

    cluster = start_cluster(cluster_factory, "n1", classes="cpu,io")
    job = cluster.submit(
        {
            "template": "photo-pipeline",
            "inputs": {"source": str(folder), "group_by": "camera", "max_edge": 100, "best": 10},
        }
    )
    done = cluster.wait_job(job["id"], timeout=120)
    assert done["state"] == "succeeded", json.dumps(done, indent=1)
    steps = steps_of(done)
    assert [st["id"] for st in done["subtasks"]] == ["classify", "resize", "best", "slideshow"]

    # 1. classify: every photo once, its EXIF read back, the broken file reported, not fatal.
    classify = steps["classify"]["output"]
    assert classify["count"] == 30 and classify["total"] == 31 and classify["failed"] == 1
    assert classify["errors"][0]["path"].endswith("broken.jpg")
    assert classify["started_from"] == 0 and classify["attempt"] == 1
    cameras = Counter(s.camera for s in specs)
    assert classify["cameras"] == dict(cameras)
    assert {g["key"]: g["count"] for g in classify["groups"]} == dict(cameras)
    assert classify["group_by"] == "camera"
    assert classify["shapes"] == dict(Counter(s.shape for s in specs))
    manifest = json.loads(Path(classify["manifest"]).read_text())
    assert manifest["photos"] == classify["photos"]
    assert sorted(p["name"] for p in classify["photos"]) == sorted(by_name)
    brightness: dict[str, list[float]] = {}
    for photo in classify["photos"]:
        spec = by_name[photo["name"]]
        assert (photo["make"], photo["model"], photo["camera"]) == (spec.make, spec.model, spec.camera)
        assert photo["taken"] == spec.taken_iso and photo["date_source"] == "DateTimeOriginal"
        assert photo["orientation"] == spec.orientation
        assert (photo["width"], photo["height"]) == spec.displayed_size
        assert photo["shape"] == spec.shape
        brightness.setdefault(spec.kind, []).append(photo["brightness"])
    assert max(brightness["dark"]) < min(brightness["sharp"]) < max(brightness["sharp"]) < min(brightness["bright"])

    # 2. resize: upright (the marker is top-left again), longest edge 100, one file per photo.
    resize = steps["resize"]["output"]
    assert resize["count"] == 30 and resize["max_edge"] == 100
    assert len({p["path"] for p in resize["photos"]}) == 30
    for entry in resize["photos"]:
        spec = by_name[Path(entry["source"]).relative_to(folder).as_posix()]
        path = Path(entry["path"])
        assert path.is_file() and path.parent == Path(resize["output_dir"])
        with Image.open(path) as img:
            assert img.format == "JPEG"
            assert img.size == expected_resized_size(spec, 100) == (entry["width"], entry["height"])
            assert img.getexif().get(0x0112, 1) == 1  # orientation applied, not merely copied
        assert is_marker(corner_colour(path)), (spec, corner_colour(path))

    # 3. best shots: ranked by score, never a blurred (or badly exposed) photo.
    best = steps["best"]["output"]
    assert best["scored"] == 30 and len(best["best"]) == 10
    assert [b["rank"] for b in best["best"]] == list(range(1, 11))
    scores = [b["score"] for b in best["best"]]
    assert scores == sorted(scores, reverse=True)
    chosen_kinds = Counter(by_name[Path(b["source"]).relative_to(folder).as_posix()].kind for b in best["best"])
    assert chosen_kinds == {"sharp": 10}, chosen_kinds
    all_scores = json.loads(Path(best["scores_file"]).read_text())["photos"]
    blurred = [r for r in all_scores if by_name[Path(r["source"]).relative_to(folder).as_posix()].kind == "blurred"]
    assert max(r["sharpness"] for r in blurred) < min(b["sharpness"] for b in best["best"]) / 10
    assert sorted(best["paths"]) == sorted(b["path"] for b in best["best"])
    taken = [next(b["taken"] for b in best["best"] if b["path"] == p) for p in best["paths"]]
    assert taken == sorted(taken)  # the slideshow runs in the order the photos were taken

    # 4. slideshow: a real H.264 MP4 of 10 photos x 1 s at 640x480.
    show = steps["slideshow"]["output"]
    video = Path(show["path"])
    assert video.is_file() and video.stat().st_size == show["bytes"] > 1000
    assert show["photos"] == 10 and show["expected_duration"] == 10.0
    probed = ffprobe(video)
    assert "mp4" in probed["format"]["format_name"]
    assert abs(float(probed["format"]["duration"]) - 10.0) < 0.1
    stream = probed["streams"][0]
    assert (stream["width"], stream["height"], stream["codec_name"]) == (640, 480, "h264")
    assert int(stream["nb_frames"]) == 250 == show["frames"]


# --- kill -9 mid-classify ------------------------------------------------------------------------


def test_node_killed_mid_classify_resumes_from_checkpoint(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    specs = make_photos(folder, 200)
    cluster = start_cluster(cluster_factory, "a", "b", classes="cpu")
    job = cluster.submit(
        {
            "template": "photo-pipeline",
            "inputs": {
                "source": str(folder),
                "checkpoint_every": 20,
                "delay_per_image": 0.02,
                "max_edge": 64,
                "best": 5,
            },
        }
    )

    def classify_midway() -> dict[str, Any] | None:
        st = steps_of(cluster.job(job["id"]))["classify"]
        done = (st.get("checkpoint") or {}).get("done", 0)
        return st if st["state"] == "running" and 40 <= done < 180 else None

    seen = wait_until(classify_midway, 60, interval=0.05, what="classify checkpointed part way")
    seen_done = seen["checkpoint"]["done"]
    victim = seen["node"]
    survivor = "b" if victim == "a" else "a"
    cluster.kill_node(victim)

    done = cluster.wait_job(job["id"], timeout=120)
    assert done["state"] == "succeeded", json.dumps(done, indent=1)
    steps = steps_of(done)
    classify = steps["classify"]
    assert classify["attempt"] == 2 and classify["resumed"] == 1 and classify["node"] == survivor
    out = classify["output"]
    assert out["attempt"] == 2
    # It started from the checkpoint, not from scratch: at least what we saw, on a checkpoint boundary.
    assert seen_done <= out["started_from"] < 200 and out["started_from"] % 20 == 0
    assert classify["checkpoint"]["done"] == 200

    # Every photo exactly once, in order; the first attempt's results kept, the rest made by the second.
    manifest = json.loads(Path(out["manifest"]).read_text())
    names = [p["name"] for p in manifest["photos"]]
    assert len(names) == len(set(names)) == 200 == out["count"]
    assert names == sorted(s.name for s in specs)
    assert [p["index"] for p in manifest["photos"]] == list(range(200))
    attempts = [p["attempt"] for p in manifest["photos"]]
    assert attempts == [1] * out["started_from"] + [2] * (200 - out["started_from"])
    assert out["photos"] == manifest["photos"]

    # The later steps saw each photo exactly once too, and the job finished.
    resize = steps["resize"]["output"]
    sources = [p["source"] for p in resize["photos"]]
    assert len(sources) == len(set(sources)) == 200
    assert len({p["path"] for p in resize["photos"]}) == 200
    assert steps["best"]["output"]["scored"] == 200
    assert Path(steps["slideshow"]["output"]["path"]).is_file()
    assert steps["slideshow"]["output"]["duration"] == pytest.approx(5.0, abs=0.1)


# --- the plugins called directly: resume details no cluster test can aim at ------------------------


class FakeStore:
    """Plays the worker's part: keeps the last checkpoint, raises cancel on demand."""

    def __init__(self) -> None:
        self.checkpoint: Any = None
        self.saved: list[Any] = []
        self.cancel_after: int | None = None

    def save(self, state: Any) -> None:
        self.checkpoint = state
        self.saved.append(state)

    def is_cancelled(self) -> bool:
        return self.cancel_after is not None and bool(self.saved) and self.saved[-1]["done"] >= self.cancel_after

    def ctx(self, workspace: Path, attempt: int) -> PluginContext:
        workspace.mkdir(parents=True, exist_ok=True)
        return PluginContext(
            job_id="job",
            subtask_id=workspace.name,
            attempt=attempt,
            workspace=workspace,
            deadline=time.monotonic() + 60,
            is_cancelled=self.is_cancelled,
            save_checkpoint=self.save,
            checkpoint=self.checkpoint,
        )


@pytest.fixture(scope="module")
def photo_plugin() -> Callable[..., dict[str, Any]]:
    catalog = PluginCatalog.load([builtin_plugin_dir()])
    plugin = catalog.get("photo")
    assert plugin is not None and catalog.unmet_dependencies("photo") == []
    return plugin.load_callable()


def test_classify_resume_drops_work_after_the_checkpoint_and_torn_lines(
    photo_plugin: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    specs: list[PhotoSpec] = make_photos(tmp_path / "photos", 50)
    store = FakeStore()
    store.cancel_after = 20
    ws = tmp_path / "job" / "classify"
    args = {"source": str(tmp_path / "photos"), "checkpoint_every": 10}
    with pytest.raises(SubtaskCancelled):
        photo_plugin(store.ctx(ws, 1), "classify", args)
    assert store.checkpoint["done"] == 20
    journal = ws / "classify.jsonl"
    # As if the first attempt got further than its checkpoint and died mid-line.
    lines = journal.read_text().splitlines()
    assert len(lines) == 20
    extra = json.loads(lines[-1])
    extra["seq"] = 20
    journal.write_text("\n".join([*lines, json.dumps(extra)]) + '\n{"seq": 21, "ent')

    store.cancel_after = None
    out = photo_plugin(store.ctx(ws, 2), "classify", args)
    assert out["started_from"] == 20 and out["count"] == 50
    names = [p["name"] for p in out["photos"]]
    assert names == sorted(s.name for s in specs)
    assert [p["attempt"] for p in out["photos"]] == [1] * 20 + [2] * 30
    assert [s["done"] for s in store.saved] == [10, 20, 30, 40, 50]

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no photos here")
    with pytest.raises(ValueError, match="no image files"):
        photo_plugin(store.ctx(tmp_path / "job" / "other", 1), "classify", {"source": str(empty)})

    # A checkpoint of another folder's listing is not resumed: it starts over.
    (tmp_path / "photos" / "day-a" / "IMG_0000.jpg").unlink()
    again = photo_plugin(store.ctx(ws, 3), "classify", args)
    assert again["started_from"] == 0 and again["count"] == 49
