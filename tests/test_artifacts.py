"""Artifacts: files move between boxes through the store, never through a shared disk.

Two nodes on one machine, each with its own data and workspace folders (they share no disk
path), a router with the default backend (its data dir), and, for the S3 backend, a real
S3-compatible HTTP server (moto_server) on 127.0.0.1. Fetches are counted by the router's
`edgefleet_artifact_downloads_total{by="node"}` and the nodes' "artifact fetched" log lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ADMIN_TOKEN, ROOT, Cluster, RedisServer, free_port, stop_process, wait_until

pytestmark = pytest.mark.cluster

NODES = ("alpha", "beta")
ROUTER_LIMIT_MB = 1  # the router's per-file limit here: the 413 test goes over it


def node_env(workdir: Path, name: str) -> dict[str, str]:
    """A box of its own: data and workspace folders no other node uses."""
    return {
        "EDGEFLEET_DATA_DIR": str(workdir / f"box-{name}" / "data"),
        "EDGEFLEET_WORKSPACE_DIR": str(workdir / f"box-{name}" / "workspaces"),
    }


@contextlib.contextmanager
def two_box_cluster(workdir: Path, **env: str) -> Iterator[Cluster]:
    server = RedisServer(port=free_port(), data_dir=workdir / "redis")
    server.start()
    cluster = Cluster(redis=server, workdir=workdir, env_overrides={"EDGEFLEET_ARTIFACT_MAX_FILE_MB": "1", **env})
    try:
        cluster.start_router()
        for name in NODES:
            cluster.start_node(name, **node_env(workdir, name))
        cluster.wait_nodes_ready(*NODES)
        yield cluster
    finally:
        cluster.stop()
        server.stop()


@pytest.fixture(scope="module")
def boxes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with two_box_cluster(tmp_path_factory.mktemp("boxes")) as cluster:
        yield cluster


def two_step(text: str, producer: str | None, consumer: str | None) -> dict[str, Any]:
    write: dict[str, Any] = {
        "id": "write",
        "plugin": "text",
        "action": "transform",
        "args": {"text": text, "op": "upper", "save_as": "out.txt"},
    }
    count: dict[str, Any] = {
        "id": "count",
        "plugin": "text",
        "action": "count",
        "args": {"path": {"$ref": "steps.write.output.path"}},
    }
    if producer:
        write["node"] = producer
    if consumer:
        count["node"] = consumer
    return {"steps": [write, count]}


def node_downloads(cluster: Cluster) -> float:
    with cluster.client() as http:
        text = http.get("/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == "edgefleet_artifact_downloads":
            return sum(s.value for s in family.samples if s.name.endswith("_total") and s.labels.get("by") == "node")
    return 0.0


def fetch_lines(cluster: Cluster, node: str) -> int:
    return cluster.log_tail(f"node-{node}", chars=10**7).count('"artifact fetched"')


def workspace(cluster: Cluster, node: str) -> Path:
    return cluster.workdir / f"box-{node}" / "workspaces"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run(cluster: Cluster, body: dict[str, Any], token: str = ADMIN_TOKEN) -> dict[str, Any]:
    job = cluster.submit(body, token=token)
    return cluster.wait_job(job["id"], timeout=90)


def steps(done: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {st["id"]: st for st in done["subtasks"]}


# --- the default backend: the router -------------------------------------------------------------


def test_a_file_moves_to_another_box_and_a_warm_box_fetches_nothing(boxes: Cluster) -> None:
    text = "the fox and the dog and the end"
    before = node_downloads(boxes)
    done = run(boxes, two_step(text, "alpha", "beta"))
    assert done["state"] == "succeeded", json.dumps(done, indent=1)
    by_id = steps(done)
    assert by_id["write"]["node"] == "alpha" and by_id["count"]["node"] == "beta"
    assert by_id["count"]["output"]["words"] == 8
    assert by_id["count"]["output"]["top"][0] == ["the", 3]

    # The job lists its artifact: content-addressed, with size, name and producing node.
    expected = text.upper().encode()
    [artifact] = done["artifacts"]
    assert artifact == {**artifact, "id": sha(expected), "size": len(expected), "name": "out.txt", "kind": "file"}
    assert artifact["node"] == "alpha" and artifact["subtask"] == "write"
    assert artifact["path"] == by_id["write"]["output"]["path"]
    with boxes.client() as http:
        assert http.get(f"/v1/jobs/{done['id']}/artifacts").json() == done["artifacts"]
    # beta has no path of alpha's: it read its own verified copy, cached by hash.
    assert not Path(artifact["path"]).is_relative_to(workspace(boxes, "beta"))
    cached = workspace(boxes, "beta") / ".artifacts" / artifact["id"]
    assert cached.read_bytes() == expected
    assert node_downloads(boxes) == before + 1
    fetched = fetch_lines(boxes, "beta")

    # The same job again: the warm consumer fetches nothing.
    again = run(boxes, two_step(text, "alpha", "beta"))
    assert again["state"] == "succeeded" and steps(again)["count"]["output"]["words"] == 8
    assert again["artifacts"][0]["id"] == artifact["id"]
    assert node_downloads(boxes) == before + 1
    assert fetch_lines(boxes, "beta") == fetched

    # Both steps on one box: the consumer reads the original, nothing is copied or fetched.
    local = run(boxes, two_step("one box only", "alpha", "alpha"))
    assert local["state"] == "succeeded" and steps(local)["count"]["output"]["words"] == 3
    assert not (workspace(boxes, "alpha") / local["id"] / ".artifacts").exists()
    assert node_downloads(boxes) == before + 1


def test_locality_sends_a_step_to_the_box_that_holds_its_inputs(boxes: Cluster) -> None:
    before = node_downloads(boxes)
    for _ in range(2):
        done = run(boxes, two_step(f"made on beta {os.urandom(4).hex()}", "beta", None))
        assert done["state"] == "succeeded", json.dumps(done, indent=1)
        count = steps(done)["count"]
        assert count["node"] == "beta"
        assert count["placement"].startswith("locality: beta holds"), count["placement"]
    assert node_downloads(boxes) == before


def test_node_credentials_need_a_live_node_and_the_current_secret(boxes: Cluster) -> None:
    from edgefleet.artifact_files import node_credential
    from edgefleet.store import JobStore

    store = JobStore.from_url(boxes.redis.url)
    try:
        old = store.artifacts.node_secret()
        with boxes.client() as http:
            artifact_id = http.post("/v1/artifacts", params={"name": "n.txt"}, content=b"for nodes").json()["id"]

        def as_node(secret: str, node: str) -> int:
            headers = {"Authorization": f"Bearer {node_credential(secret, node)}"}
            return httpx.get(f"{boxes.url}/v1/artifacts/{artifact_id}", headers=headers, timeout=10).status_code

        assert as_node(old, "beta") == 200
        assert as_node(old, "ghost") == 401  # right secret, but no such live node
        store.artifacts.rotate_node_secret()  # as when a box that knew it is revoked
        assert as_node(old, "beta") == 401
        assert as_node(store.artifacts.node_secret(), "beta") == 200
        # The nodes notice (a 401), make new credentials and move files as before.
        done = run(boxes, two_step(f"after a rotation {os.urandom(4).hex()}", "alpha", "beta"))
        assert done["state"] == "succeeded", json.dumps(done, indent=1)
    finally:
        store.close()


def test_a_node_uploads_in_one_pass_and_the_router_names_what_it_received(boxes: Cluster) -> None:
    """`POST /v1/node-artifacts`: the node sends without naming the bytes; the router stores them
    under the sha256 of what it received and answers it (the node compares it with its own)."""
    from edgefleet.artifact_files import node_credential
    from edgefleet.store import JobStore

    store = JobStore.from_url(boxes.redis.url)
    try:
        node = {"Authorization": f"Bearer {node_credential(store.artifacts.node_secret(), 'alpha')}"}
    finally:
        store.close()
    body = os.urandom(3 * 65536 + 17)

    def chunked() -> Iterator[bytes]:  # several chunks, no Content-Length
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    with httpx.Client(base_url=boxes.url, timeout=30) as http:
        stored = http.post("/v1/node-artifacts", content=chunked(), headers=node)
        assert stored.status_code == 201, stored.text
        assert stored.json() == {"id": sha(body), "size": len(body)}
        assert http.get(f"/v1/artifacts/{sha(body)}", headers=node).status_code == 404  # in no job yet
        blob = boxes.workdir / "data" / "artifacts" / sha(body)[:2] / sha(body)
        assert blob.read_bytes() == body
        # The same bytes again: the one stored copy stays.
        assert http.post("/v1/node-artifacts", content=body, headers=node).json()["id"] == sha(body)
        assert blob.read_bytes() == body

        client = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        refused = http.post("/v1/node-artifacts", content=b"from a client", headers=client)
        assert refused.status_code == 403 and refused.json()["detail"][0]["field"] == "Authorization"
        too_big = os.urandom(ROUTER_LIMIT_MB * 2**20 + 1)
        over = http.post("/v1/node-artifacts", content=too_big, headers=node)
        assert over.status_code == 413 and over.json()["detail"][0]["field"] == "body"
    assert not (boxes.workdir / "data" / "artifacts" / sha(too_big)[:2] / sha(too_big)).exists()


def test_a_corrupt_cached_copy_is_fetched_again_never_used(boxes: Cluster) -> None:
    text = "cached then corrupted on disk"
    first = run(boxes, two_step(text, "alpha", "beta"))
    assert first["state"] == "succeeded"
    cached = workspace(boxes, "beta") / ".artifacts" / first["artifacts"][0]["id"]
    good = cached.read_bytes()
    cached.chmod(0o644)
    cached.write_bytes(b"X" * len(good))  # same size, other bytes
    before = node_downloads(boxes)
    done = run(boxes, two_step(text, "alpha", "beta"))
    assert done["state"] == "succeeded"
    assert steps(done)["count"]["output"]["top"][0] == ["cached", 1]  # the plugin read the real text
    assert cached.read_bytes() == good
    assert node_downloads(boxes) == before + 1
    assert "cached artifact is corrupt" in boxes.log_tail("node-beta", chars=10**7)


def test_an_upload_used_as_artifact_argument(boxes: Cluster) -> None:
    content = b"uploaded words, uploaded from the client\n"
    with boxes.client("alice-token") as http:
        answer = http.post("/v1/artifacts", params={"name": "notes.txt"}, content=content)
    assert answer.status_code == 201, answer.text
    info = answer.json()
    assert info["id"] == sha(content) and info["size"] == len(content) and info["name"] == "notes.txt"
    body = {
        "steps": [{"id": "count", "plugin": "text", "action": "count", "args": {"path": {"$artifact": info["id"]}}}]
    }
    done = run(boxes, body, token="alice-token")
    assert done["state"] == "succeeded", json.dumps(done, indent=1)
    output = steps(done)["count"]["output"]
    assert output["words"] == 6 and output["top"][0] == ["uploaded", 2]


def test_a_corrupt_download_fails_the_attempt_and_is_retried_never_fed_to_the_plugin(boxes: Cluster) -> None:
    content = f"stored, then rotted at the router {os.urandom(4).hex()}\n".encode()
    with boxes.client() as http:
        artifact_id = http.post("/v1/artifacts", params={"name": "rot.txt"}, content=content).json()["id"]
    stored = boxes.workdir / "data" / "artifacts" / artifact_id[:2] / artifact_id
    stored.chmod(0o644)
    stored.write_bytes(content.replace(b"stored", b"STORED"))
    body = {
        "steps": [
            {
                "id": "count",
                "plugin": "text",
                "action": "count",
                "args": {"path": {"$artifact": artifact_id}},
                "node": "beta",
                "retries": 1,
                "retry_backoff": 0.1,
            }
        ]
    }
    done = run(boxes, body)
    count = steps(done)["count"]
    assert done["state"] == "failed" and count["attempt"] == 2  # retried, failed again the same way
    assert "arrived corrupt" in count["error"] and count["output"] is None
    assert not (workspace(boxes, "beta") / ".artifacts" / artifact_id).exists()
    assert not (workspace(boxes, "beta") / done["id"] / ".artifacts").exists()


def test_range_requests(boxes: Cluster) -> None:
    content = bytes(range(256)) * 4
    with boxes.client("alice-token") as http:
        artifact_id = http.post("/v1/artifacts", params={"name": "bytes.bin"}, content=content).json()["id"]
        whole = http.get(f"/v1/artifacts/{artifact_id}")
        part = http.get(f"/v1/artifacts/{artifact_id}", headers={"Range": "bytes=10-19"})
        tail = http.get(f"/v1/artifacts/{artifact_id}", headers={"Range": "bytes=-5"})
        beyond = http.get(f"/v1/artifacts/{artifact_id}", headers={"Range": "bytes=5000-"})
    assert whole.status_code == 200 and whole.content == content
    assert part.status_code == 206 and part.content == content[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(content)}"
    assert tail.status_code == 206 and tail.content == content[-5:]
    assert beyond.status_code == 416


def test_unknown_or_other_tenants_artifacts_are_refused_naming_the_field(boxes: Cluster) -> None:
    with boxes.client("bob-token") as http:
        bobs = http.post("/v1/artifacts", params={"name": "bob.txt"}, content=b"bob's own words").json()["id"]
    unknown = "0" * 64
    with boxes.client("alice-token") as http:
        for artifact_id in (unknown, bobs):
            step = {"id": "c", "plugin": "text", "action": "count", "args": {"path": {"$artifact": artifact_id}}}
            answer = http.post("/v1/jobs", json={"steps": [step]})
            assert answer.status_code == 422, answer.text
            assert answer.json()["detail"] == [
                {
                    "field": "steps.0.args.path",
                    "reason": f"no artifact {artifact_id!r}; upload it with POST /v1/artifacts",
                }
            ]
            got = http.get(f"/v1/artifacts/{artifact_id}")
            assert got.status_code == 404 and got.json()["detail"][0]["field"] == "artifact_id"
        step = {"id": "c", "plugin": "text", "action": "count", "args": {"path": {"$artifact": "not-an-id"}}}
        answer = http.post("/v1/jobs", json={"steps": [step]})
        assert answer.status_code == 422 and answer.json()["detail"][0]["field"] == "steps.0.args.path"
    with boxes.client("bob-token") as http:
        assert http.get(f"/v1/artifacts/{bobs}").content == b"bob's own words"


def test_an_upload_over_the_limit_is_413_and_leaves_nothing(boxes: Cluster) -> None:
    too_big = os.urandom(ROUTER_LIMIT_MB * 2**20 + 1)
    store = boxes.workdir / "data" / "artifacts"
    with boxes.client() as http:
        declared = http.post("/v1/artifacts", params={"name": "big.bin"}, content=too_big)
        assert declared.status_code == 413 and declared.json()["detail"][0]["field"] == "body"

        def chunked() -> Iterator[bytes]:  # no Content-Length: refused once the limit is passed
            for i in range(0, len(too_big), 65536):
                yield too_big[i : i + 65536]

        streamed = http.post("/v1/artifacts", params={"name": "big.bin"}, content=chunked())
        assert streamed.status_code == 413
        assert http.get(f"/v1/artifacts/{sha(too_big)}").status_code == 404
    assert not (store / sha(too_big)[:2] / sha(too_big)).exists()
    assert list((store / ".tmp").iterdir()) == []


def test_cli_sends_a_photo_folder_and_fetches_the_slideshow(boxes: Cluster, tmp_path: Path) -> None:
    """`submit --input source=@folder` uploads the folder as one artifact, unpacked as a folder
    where classify runs; `edgefleet fetch` brings the slideshow MP4 back, sha256-checked."""
    from tests.photo_fixtures import make_photos

    photos = tmp_path / "photos"
    make_photos(photos, 4, size=(96, 72))
    env = {**boxes.env(), "EDGEFLEET_TOKEN": ADMIN_TOKEN}
    cli = [sys.executable, "-m", "edgefleet"]
    submit = [*cli, "submit", "--template", "photo-pipeline", "--input", f"source=@{photos}"]
    submit += ["--input", "best:=2", "--input", "max_edge:=64", "--input", "seconds_per_photo:=0.5"]
    submitted = subprocess.run(
        [*submit, "--wait", "--timeout", "150"], env=env, capture_output=True, text=True, timeout=180
    )
    job_id = submitted.stdout.split()[0] if submitted.stdout else ""
    assert submitted.returncode == 0, (
        f"{submitted.stderr}\n{[(s['id'], s['node'], s['placement']) for s in boxes.job(job_id)['subtasks']] if job_id else None}"
    )
    done = boxes.job(job_id)
    classify = steps(done)["classify"]
    assert classify["output"]["count"] == 4
    first = classify["output"]["photos"][0]
    assert "/.artifacts/" in first["path"]  # read from the box's copy of the uploaded folder
    [movie] = [a for a in done["artifacts"] if a["subtask"] == "slideshow"]
    assert movie["name"].endswith(".mp4")

    dest = tmp_path / "out"
    fetched = subprocess.run([*cli, "fetch", job_id, str(dest)], env=env, capture_output=True, text=True, timeout=60)
    assert fetched.returncode == 0, fetched.stderr
    got = dest / movie["name"]
    assert fetched.stdout.split() == [str(got)]
    assert sha(got.read_bytes()) == movie["id"] and got.stat().st_size == movie["size"]


# --- the S3 backend ------------------------------------------------------------------------------


@pytest.fixture()
def moto_s3(tmp_path: Path) -> Iterator[dict[str, str]]:
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if server is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]', the dev extra)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "EDGEFLEET_ARTIFACT_BACKEND": "s3",
        "EDGEFLEET_ARTIFACT_S3_BUCKET": "fleet",
        "EDGEFLEET_ARTIFACT_S3_ENDPOINT_URL": url,
        "EDGEFLEET_ARTIFACT_S3_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "test-key",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
    }
    with open(tmp_path / "moto.log", "ab") as log:
        proc = subprocess.Popen(
            [server, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until(lambda: _answers(url), 30, what="moto_server")
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="test-key",
            aws_secret_access_key="test-secret",
        )
        s3.create_bucket(Bucket="fleet")
        yield env
    finally:
        stop_process(proc, signal.SIGTERM)


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
        return True
    except httpx.HTTPError:
        return False


def test_s3_backend_moves_files_between_boxes(moto_s3: dict[str, str], tmp_path: Path) -> None:
    import boto3

    with two_box_cluster(tmp_path, **moto_s3) as cluster:
        done = run(cluster, two_step("through the bucket and back", "alpha", "beta"))
        assert done["state"] == "succeeded", json.dumps(done, indent=1)
        assert steps(done)["count"]["output"]["words"] == 5
        [artifact] = done["artifacts"]
        s3 = boto3.client(
            "s3",
            endpoint_url=moto_s3["EDGEFLEET_ARTIFACT_S3_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id="test-key",
            aws_secret_access_key="test-secret",
        )
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="fleet").get("Contents", [])]
        assert keys == [f"edgefleet/artifacts/{artifact['id'][:2]}/{artifact['id']}"]
        assert not (tmp_path / "data" / "artifacts").exists()  # the router kept nothing itself
        assert fetch_lines(cluster, "beta") == 1

        # A box that produced a file and died: the file was stored when its step succeeded.
        made = run(cluster, {"steps": [two_step("outlives its box", "alpha", None)["steps"][0]]})
        assert made["state"] == "succeeded"
        output_id = made["artifacts"][0]["id"]
        cluster.kill_node("alpha")
        step = {
            "id": "count",
            "plugin": "text",
            "action": "count",
            "args": {"path": {"$artifact": output_id}},
            "node": "beta",
        }
        done = run(cluster, {"steps": [step]})
        assert done["state"] == "succeeded" and steps(done)["count"]["output"]["words"] == 3
        assert fetch_lines(cluster, "beta") == 2

        # Downloads through the router, Range included, come from the bucket.
        with cluster.client() as http:
            part = http.get(f"/v1/artifacts/{output_id}", headers={"Range": "bytes=0-7"})
        assert part.status_code == 206 and part.content == b"OUTLIVES"


def test_the_artifact_cli_module_is_importable_without_the_router() -> None:
    """`edgefleet fetch` runs on a laptop with the client only (no FastAPI)."""
    probe = "import sys; import edgefleet.cli.artifacts; assert 'fastapi' not in sys.modules"
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=ROOT, timeout=60)
