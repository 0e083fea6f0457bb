"""edgefleet.pluginkit: the helpers plugins share, exercised for real (real processes, files, tars)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edgefleet.plugin_context import ModelUnavailable, PluginContext, SubtaskCancelled
from edgefleet.pluginkit.actions import absolute_dir_arg, dispatch, stop_cancelled
from edgefleet.pluginkit.archive import open_tar, unpack_tar
from edgefleet.pluginkit.files import load_manifest
from edgefleet.pluginkit.models import answer_text, call_model, error_text, model_for
from edgefleet.pluginkit.proc import kill_process, run_in_group, scrubbed_env, supervise
from edgefleet.pluginkit.text import (
    STOP_WORDS,
    read_blocks,
    render_blocks,
    split_sentences,
)


def make_ctx(workspace: Path, *, timeout: float = 30.0, cancel: threading.Event | None = None) -> PluginContext:
    workspace.mkdir(parents=True, exist_ok=True)
    return PluginContext(
        job_id="job-kit",
        subtask_id=workspace.name,
        attempt=1,
        workspace=workspace,
        deadline=time.monotonic() + timeout,
        is_cancelled=(cancel or threading.Event()).is_set,
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for_file(path: Path, timeout: float = 10.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.02)
    raise AssertionError(f"{path} was not written")


# A child that starts a grandchild in its own (the child's) process group, writes the
# grandchild's pid, and then waits forever.
# Both sleep past the test timeout (180 s): a test that returns at all did not wait for them.
SPAWNS_GRANDCHILD = (
    "import subprocess, sys, time\n"
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "open(sys.argv[1], 'w').write(str(g.pid))\n"
    "time.sleep(600)\n"
)


# --- actions -------------------------------------------------------------------------------------


def test_dispatch_calls_the_action_and_names_the_others(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    actions = {"one": lambda c, a: {"got": a["x"], "ctx": c is ctx}, "two": lambda c, a: {}}
    assert dispatch(ctx, "one", {"x": 1}, plugin="demo", actions=actions) == {"got": 1, "ctx": True}
    with pytest.raises(ValueError, match=r"^demo plugin has no action 'three' \(actions: one, two\)$"):
        dispatch(ctx, "three", {}, plugin="demo", actions=actions)


def test_absolute_dir_arg(tmp_path: Path) -> None:
    assert absolute_dir_arg({"index_dir": str(tmp_path)}, "index_dir") == tmp_path
    with pytest.raises(ValueError, match="'index_dir' must be a non-empty path"):
        absolute_dir_arg({"index_dir": "  "}, "index_dir")
    with pytest.raises(ValueError, match="'cache' must be a non-empty path"):
        absolute_dir_arg({}, "cache")
    with pytest.raises(ValueError, match="'cache' must be an absolute path, got 'rel/dir'"):
        absolute_dir_arg({"cache": "rel/dir"}, "cache")


def test_stop_cancelled_raises_the_right_reason(tmp_path: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(SubtaskCancelled) as cancelled:
        stop_cancelled(make_ctx(tmp_path / "c", cancel=cancel))
    assert not cancelled.value.timed_out
    with pytest.raises(SubtaskCancelled) as expired:
        stop_cancelled(make_ctx(tmp_path / "e", timeout=-1))
    assert expired.value.timed_out
    # Even when nothing says "cancelled" any more, it does not return.
    with pytest.raises(SubtaskCancelled):
        stop_cancelled(make_ctx(tmp_path / "n"))


# --- proc ----------------------------------------------------------------------------------------


def test_scrubbed_env_keeps_only_what_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLUGINKIT_KEEP", "yes")
    monkeypatch.setenv("PLUGINKIT_SECRET", "s3cret")
    monkeypatch.delenv("PLUGINKIT_UNSET", raising=False)
    env = scrubbed_env(("PLUGINKIT_KEEP", "PLUGINKIT_UNSET"), {"HOME": "/w", "PLUGINKIT_KEEP": "over"})
    assert env == {"PLUGINKIT_KEEP": "over", "HOME": "/w"}
    assert scrubbed_env(("PLUGINKIT_KEEP",), {}) == {"PLUGINKIT_KEEP": "yes"}


def test_run_in_group_returns_output_and_exit_code(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    code = "import os, sys; print(os.getcwd()); print(os.environ.get('ONLY')); sys.stderr.write('err'); sys.exit(3)"
    outcome = run_in_group(
        ctx,
        [sys.executable, "-c", code],
        limit=30,
        env={"ONLY": "this"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert outcome.returncode == 3 and not outcome.timed_out
    assert outcome.stdout is not None and outcome.stdout.decode().split() == [str(tmp_path), "this"]
    assert outcome.stderr == b"err"


def test_run_in_group_timeout_kills_the_whole_group(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    pid_file = tmp_path / "grandchild.pid"
    outcome = run_in_group(ctx, [sys.executable, "-c", SPAWNS_GRANDCHILD, str(pid_file)], limit=1.0)
    assert outcome.timed_out and outcome.returncode == -signal.SIGKILL
    grandchild = int(wait_for_file(pid_file))
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:  # reaped by init once killed
        time.sleep(0.05)
    assert not alive(grandchild)


def test_run_in_group_interrupts_first_when_asked(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    report = tmp_path / "report.txt"
    # Like pytest: on SIGINT it still writes its report, then exits.
    code = (
        "import signal, sys, time\n"
        "def on_int(*_):\n"
        "    open(sys.argv[1], 'w').write('interrupted')\n"
        "    sys.exit(2)\n"
        "signal.signal(signal.SIGINT, on_int)\n"
        "time.sleep(60)\n"
    )
    outcome = run_in_group(ctx, [sys.executable, "-c", code, str(report)], limit=1.0, interrupt_grace=10.0)
    assert outcome.timed_out and outcome.returncode == 2
    assert report.read_text() == "interrupted"


def test_run_in_group_cancel_kills_and_raises(tmp_path: Path) -> None:
    cancel = threading.Event()
    ctx = make_ctx(tmp_path, cancel=cancel)
    pid_file = tmp_path / "grandchild.pid"
    threading.Thread(target=lambda: (wait_for_file(pid_file), cancel.set()), daemon=True).start()
    with pytest.raises(SubtaskCancelled):
        run_in_group(ctx, [sys.executable, "-c", SPAWNS_GRANDCHILD, str(pid_file)], limit=None)
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)


def test_run_in_group_missing_program_is_the_callers_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        run_in_group(make_ctx(tmp_path), [str(tmp_path / "no-such-program")], limit=5)


def test_supervise_ticks_and_kills_a_child_in_our_group(tmp_path: Path) -> None:
    cancel = threading.Event()
    ctx = make_ctx(tmp_path, cancel=cancel)
    ticks: list[float] = []

    def tick() -> None:
        ticks.append(time.monotonic())
        if len(ticks) == 3:
            cancel.set()

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.DEVNULL)
    assert os.getpgid(proc.pid) == os.getpgid(0)  # same group: killpg would hit this test too
    with pytest.raises(SubtaskCancelled):
        supervise(ctx, proc, stop=kill_process, poll=0.05, tick=tick)
    assert len(ticks) == 3
    assert proc.returncode == -signal.SIGKILL

    done = subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.DEVNULL)
    outcome = supervise(make_ctx(tmp_path / "ok"), done, stop=kill_process)
    assert outcome.returncode == 0 and not outcome.timed_out and outcome.stdout is None


# --- archive -------------------------------------------------------------------------------------


def make_tar(path: Path, members: dict[str, str]) -> Path:
    """A tar of real files, stored under the member names given (which may try to escape)."""
    staging = path.with_name(path.name + ".files")
    with tarfile.open(path, "w") as tar:
        for n, (name, text) in enumerate(members.items()):
            source = staging / str(n)
            source.parent.mkdir(parents=True, exist_ok=True)
            source.write_text(text)
            tar.add(source, arcname=name)
    return path


def test_unpack_tar_replaces_the_tree(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "src.tar", {"pkg/a.py": "A = 1\n", "README": "hi\n"})
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "stale.txt").write_text("from an earlier attempt")
    unpack_tar(archive, dest)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == ["README", "pkg/a.py"]
    assert (dest / "pkg/a.py").read_text() == "A = 1\n"


def test_unpack_tar_refuses_bad_input(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("untouched")
    with pytest.raises(ValueError, match="does not exist or is not a file"):
        unpack_tar(tmp_path / "missing.tar", dest)
    assert (dest / "keep.txt").exists()  # checked before the tree is emptied
    not_tar = tmp_path / "not.tar"
    not_tar.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(ValueError, match="is not a readable tar file"):
        unpack_tar(not_tar, dest)
    escaping = make_tar(tmp_path / "evil.tar", {"../escaped.txt": "gotcha"})
    with pytest.raises(ValueError):
        unpack_tar(escaping, tmp_path / "out2")
    assert not (tmp_path / "escaped.txt").exists()


def test_open_tar_reads_members_and_wraps_errors(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "src.tar", {"x.py": "import os\n"})
    with open_tar(archive) as tar:
        handle = tar.extractfile("x.py")
        assert handle is not None and handle.read() == b"import os\n"
    with pytest.raises(ValueError, match=r"^archive: .*src.tar is not a readable tar file"), open_tar(archive):
        raise tarfile.ReadError("truncated member")


# --- files ---------------------------------------------------------------------------------------


def test_load_manifest(tmp_path: Path) -> None:
    good = tmp_path / "manifest.json"
    good.write_text(json.dumps({"photos": [{"path": "/a.jpg"}, {"path": "/b.jpg", "error": "x"}]}))
    assert load_manifest(good, producer="photo.classify") == [{"path": "/a.jpg"}, {"path": "/b.jpg", "error": "x"}]
    with pytest.raises(ValueError, match="manifest: cannot read"):
        load_manifest(tmp_path / "missing.json", producer="photo.classify")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        load_manifest(broken, producer="photo.classify")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"photos": [{"name": "no path"}]}))
    with pytest.raises(ValueError, match=r"has no 'photos' list \(is it a photo.resize manifest\?\)"):
        load_manifest(wrong, producer="photo.resize")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"items": [{"id": 1}]}))
    assert load_manifest(other, producer="x", key="items", required="id") == [{"id": 1}]


# --- text ----------------------------------------------------------------------------------------


def test_split_sentences() -> None:
    text = 'Edge boxes run jobs. They checkpoint, e.g. the photo step. "Quoted" starts here! 3 more? yes.'
    assert split_sentences(text) == [
        "Edge boxes run jobs.",
        "They checkpoint, e.g. the photo step.",
        '"Quoted" starts here!',
        "3 more? yes.",
    ]
    assert split_sentences("   ") == []


def test_stop_words_are_function_words() -> None:
    assert {"the", "and", "or", "not", "what", "who", "which"} <= STOP_WORDS
    assert not {"cluster", "photo", "sqlite", "near"} & STOP_WORDS


def test_text_blocks_round_trip(tmp_path: Path) -> None:
    blocks = [("heading", "Title"), ("text", "First paragraph."), ("text", "Second, with # inside.")]
    path = tmp_path / "page.txt"
    path.write_text(render_blocks(blocks), encoding="utf-8")
    assert path.read_text() == "# Title\n\nFirst paragraph.\n\nSecond, with # inside.\n"
    assert read_blocks(path) == blocks


# --- models --------------------------------------------------------------------------------------


class Generator:
    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def generate(self, prompt: str, **options: Any) -> Any:
        self.calls.append((prompt, options))
        return self.answer


class TextObject:
    text = "as an attribute"


def test_call_model_accepts_the_usual_shapes() -> None:
    model = Generator("plain")
    assert call_model(model, "hi", max_tokens=7) == "plain"
    assert model.calls == [("hi", {"max_tokens": 7})]

    def no_options(prompt: str) -> dict[str, Any]:  # a callable that takes no max_tokens
        return {"choices": [{"message": {"content": f"chat: {prompt}"}}]}

    assert call_model(no_options, "q", max_tokens=5) == "chat: q"
    assert call_model(Generator({"choices": [{"text": "completion"}]}), "q", max_tokens=5) == "completion"
    assert call_model(Generator(TextObject()), "q", max_tokens=5) == "as an attribute"
    with pytest.raises(TypeError, match="has no generate/complete method"):
        call_model(object(), "q", max_tokens=5)


def test_answer_text_keys() -> None:
    assert answer_text({"content": "c", "answer": "a"}) == "c"
    assert answer_text({"summary": "s", "answer": "a"}) == "a"
    assert answer_text({"summary": "s", "answer": "a"}, ("summary", "answer")) == "s"
    with pytest.raises(TypeError, match="model returned dict, not text"):
        answer_text({"summary": "s"})
    with pytest.raises(TypeError, match="model returned int, not text"):
        answer_text(42)


class ContextWithModel(PluginContext):
    def model(self, task_type: str) -> Any:
        if task_type != "summarize":
            raise ModelUnavailable(f"nothing for {task_type}")
        return Generator("a summary")


def test_model_for_falls_back_quietly(tmp_path: Path) -> None:
    plain = make_ctx(tmp_path / "plain")
    model, why = model_for(plain, "qa")
    assert model is None and why is not None and why.startswith("ModelUnavailable: ")
    ctx = ContextWithModel(job_id="j", subtask_id="s", attempt=1, workspace=tmp_path, deadline=time.monotonic() + 9)
    model, why = model_for(ctx, "summarize")
    assert why is None and call_model(model, "p", max_tokens=1) == "a summary"
    assert model_for(ctx, "qa") == (None, "ModelUnavailable: nothing for qa")
    assert error_text(ValueError("bad")) == "ValueError: bad"
