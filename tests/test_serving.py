"""The lifelong generator as an MLflow model: logged and registered once per checkpoint, predictions equal
to `piggyback translate`, and every bad request a clear client error; in process, then over HTTP from
the tiny pipeline's registered model (`check_served_pipeline_model`, run by test_pipeline.py)."""
from __future__ import annotations

import base64
import io
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from piggyback import GeneratorConfig, LifelongModel, save_lifelong
from piggyback.config import load_params
from piggyback.translate import translate_folder

pytestmark = pytest.mark.usefixtures("single_thread")

SIDE = 32   # data.crop_size of the params below: the task's test size


def png_b64(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode(b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def bomb_b64() -> str:
    """A valid PNG header declaring 20000 x 20000 pixels (400 M) in front of a tiny image's data."""
    import struct
    import zlib

    raw = io.BytesIO()
    Image.new("1", (8, 8)).save(raw, format="PNG")
    data = bytearray(raw.getvalue())
    ihdr = data[12:29]                                     # b"IHDR" + 13 bytes of header fields
    ihdr[4:12] = struct.pack(">II", 20000, 20000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return base64.b64encode(bytes(data)).decode("ascii")


# One request per way a client can get it wrong: (name, rows, words the error message must contain).
BAD_REQUESTS = [
    ("unknown task", [{"task": "nope", "image": "<img>"}], "not a task of this model"),
    ("G_B of a pix2pix task", [{"task": "p", "generator": "G_B", "image": "<img>"}], "pix2pix task"),
    ("missing image", [{"task": "p"}], "image"),
    ("not an image", [{"task": "p", "image": base64.b64encode(b"hello, not a picture").decode()}], "not a PNG or JPEG"),
    ("not base64", [{"task": "p", "image": "%%%"}], "not valid base64"),
    ("decompression bomb", [{"task": "p", "image": "<bomb>"}], "over the limit"),
    ("too many rows", [{"task": "p", "image": "<img>"}] * 65, "1 to 64 images"),
    ("image too large", [{"task": "p", "image": "A" * (17 * 2**20 * 4 // 3)}], "limit of 16 MiB"),
]


def bad_rows(rows: list[dict]) -> list[dict]:
    good, bomb = png_b64(noise(SIDE, SIDE)), bomb_b64()
    return [{k: {"<img>": good, "<bomb>": bomb}.get(v, v) for k, v in r.items()} for r in rows]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Tasks p (pix2pix) and c (cyclegan) of a tiny ResNet generator, weights moved away from init."""
    torch.manual_seed(0)
    model = LifelongModel(GeneratorConfig(netG="resnet_6blocks", ngf=4))
    for name, mode in (("p", "pix2pix"), ("c", "cyclegan")):
        nets = model.add_task(name, mode, dataset=f"ds_{name}")
        with torch.no_grad():
            for net in nets.values():
                for p in net.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
        model.finish_task()
    return save_lifelong(model, tmp_path_factory.mktemp("ckpt") / "c")


@pytest.fixture(scope="module")
def store(tmp_path_factory, checkpoint):
    """A params file and an MLflow store holding two finished task runs and a pipeline run."""
    from piggyback import tracking

    root = tmp_path_factory.mktemp("store")
    raw = {"data": {"load_size": 36, "crop_size": SIDE}, "mlflow": {"tracking_uri": f"sqlite:///{root}/mlflow.db"},
           "datasets": {"d": {"source": "embedded", "kind": "edges"}},
           "tasks": {"p": {"dataset": "d", "prev": "init", "mode": "pix2pix"}}}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(root / "params.yaml")
    task_runs = {}
    for t in ("p", "c"):
        tr = tracking.open_run(params.mlflow, 0, f"train:{t}", tags={"task": t})
        tr.end("FINISHED")
        task_runs[t] = tr.run_id
    summary = {"final_checkpoint": str(checkpoint),
               "tasks": [{"name": t, "mlflow_run_id": rid} for t, rid in task_runs.items()]}
    return params, summary


def registry(params):
    """A client of the test store's registry (never MLflow's process-global one)."""
    import mlflow

    from piggyback.tracking import tracking_uri

    return mlflow.MlflowClient(tracking_uri(params.mlflow), registry_uri=tracking_uri(params.mlflow))


def pipeline_run(params):
    from piggyback import tracking

    return tracking.open_run(params.mlflow, 0, "pipeline:test", tags={"kind": "pipeline"})


@pytest.fixture(scope="module")
def published(store):
    from piggyback.publish import publish_model

    params, summary = store
    tr = pipeline_run(params)
    uri = publish_model(params, summary, tr.run_id)
    tr.end("FINISHED")
    return uri, tr


@pytest.fixture(scope="module")
def served(store, published):
    import mlflow

    from piggyback.tracking import tracking_uri

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri(store[0].mlflow))
    yield mlflow.pyfunc.load_model(published[0])
    mlflow.set_tracking_uri(before)


def test_registered_version_with_tags_signature_and_links(store, published, served, checkpoint):
    from piggyback.checkpoint import read_meta
    from piggyback.publish import requirements

    params, summary = store
    uri, tr = published
    assert uri == "models:/piggyback-gan/1"
    client = registry(params)
    v = client.get_model_version("piggyback-gan", "1")
    assert v.run_id == tr.run_id
    assert v.tags["tasks"] == "p:pix2pix,c:cyclegan" and v.tags["method"] == "piggyback"
    assert v.tags["checkpoint.sha256"] == read_meta(checkpoint)["meta_sha256"]
    assert v.tags["lambda"] == "0.25" and v.tags["image_size"] == str(SIDE)
    assert {"git.commit", "dvc.exp_name"} <= set(v.tags)
    for rid in [tr.run_id] + [r["mlflow_run_id"] for r in summary["tasks"]]:
        assert client.get_run(rid).data.tags["model.uri"] == uri
    local = __import__("mlflow").artifacts.download_artifacts(uri)     # `served` pointed MLflow at the store
    reqs = open(f"{local}/requirements.txt").read().split()
    assert "torch==2.14.1" in reqs and not any("pytest" in r for r in reqs)
    assert reqs[-len(requirements()):] == requirements()
    mlmodel = yaml.safe_load(open(f"{local}/MLmodel"))
    assert mlmodel["signature"]["inputs"] and mlmodel["saved_input_example_info"]
    outputs = client.get_run(tr.run_id).outputs.model_outputs
    assert [f"models:/{o.model_id}" for o in outputs] == [v.source]    # the UI shows it on the pipeline run


def test_same_checkpoint_makes_no_new_version_and_a_new_one_does(store, published, checkpoint, tmp_path):
    from piggyback.checkpoint import load_lifelong
    from piggyback.publish import publish_model

    params, summary = store
    tr = pipeline_run(params)
    assert publish_model(params, summary, tr.run_id) == "models:/piggyback-gan/1"
    assert tr.client.get_run(tr.run_id).data.tags["model.uri"] == "models:/piggyback-gan/1"
    model = load_lifelong(checkpoint)
    model.tasks[0]["dataset"] = "renamed"                      # another checkpoint (its meta hash differs)
    other = save_lifelong(model, tmp_path / "other")
    assert publish_model(params, dict(summary, final_checkpoint=str(other)), tr.run_id) \
        == "models:/piggyback-gan/2"
    tr.end("FINISHED")


def test_null_registered_model_logs_the_model_without_registering(store, published):
    from dataclasses import replace

    from piggyback.publish import publish_model

    params, summary = store
    params = replace(params, mlflow=replace(params.mlflow, registered_model=None))
    tr = pipeline_run(params)
    before = len(registry(params).search_model_versions("name = 'piggyback-gan'"))
    assert before >= 1
    uri = publish_model(params, summary, tr.run_id)
    tr.end("FINISHED")
    (logged,) = tr.client.get_run(tr.run_id).outputs.model_outputs
    assert uri == f"models:/{logged.model_id}"
    assert len(registry(params).search_model_versions("name = 'piggyback-gan'")) == before


def test_predictions_equal_piggyback_translate(served, checkpoint, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    noise(SIDE, SIDE).save(inputs / "x.png")
    rows = [{"task": "p", "image": "data:image/png;base64," + png_b64(noise(SIDE, SIDE))},   # a data URL too
            {"task": "c", "generator": "G_B", "image": png_b64(noise(SIDE, SIDE))},
            {"task": "c", "generator": "AtoB", "image": png_b64(noise(SIDE, SIDE))}]
    out = served.predict(pd.DataFrame(rows))
    assert list(out.columns) == ["image", "width", "height"] and len(out) == 3
    for (task, which), b64 in zip((("p", "G_A"), ("c", "G_B"), ("c", "G_A")), out["image"]):
        (path,) = translate_folder(checkpoint, task, inputs, tmp_path / f"{task}{which}", which=which, device="cpu")
        assert np.abs(decode(b64) - np.array(Image.open(path), dtype=np.int16)).max() <= 1, (task, which)


def test_any_size_in_resized_as_the_test_transform_out_at_input_or_task_size(served):
    img = noise(50, 20, seed=1).convert("L")                    # odd size, grey, sent as JPEG
    out = served.predict(pd.DataFrame([{"task": "p", "image": png_b64(img, "JPEG")},
                                       {"task": "p", "image": png_b64(img, "JPEG"), "size": "task"}]))
    assert (out["width"].tolist(), out["height"].tolist()) == ([50, SIDE], [20, SIDE])
    assert decode(out["image"][0]).shape == (20, 50, 3) and decode(out["image"][1]).shape == (SIDE, SIDE, 3)
    sent = Image.open(io.BytesIO(base64.b64decode(png_b64(img, "JPEG")))).convert("RGB")
    at_task_size = png_b64(sent.resize((SIDE, SIDE), Image.BICUBIC))          # the test transform, by hand
    direct = served.predict(pd.DataFrame([{"task": "p", "image": at_task_size, "size": "task"}]))
    assert np.abs(decode(direct["image"][0]) - decode(out["image"][1])).max() <= 1
    exif, buf = Image.Exif(), io.BytesIO()
    exif[0x0112] = 6                                            # "rotate 90 degrees to show": 20 wide, 50 high
    img.save(buf, format="JPEG", exif=exif)
    turned = served.predict(pd.DataFrame([{"task": "p", "image": base64.b64encode(buf.getvalue()).decode()}]))
    assert (turned["width"][0], turned["height"][0]) == (20, 50)


@pytest.mark.parametrize("name,rows,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_are_client_errors_naming_the_problem(served, name, rows, words):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as e:
        served.predict(pd.DataFrame(bad_rows(rows)))
    assert e.value.get_http_status_code() == 400 and words in e.value.message, e.value.message


# ----------------------------------------------------------------------------------------------
# Over HTTP: the registered model of test_pipeline.py's tiny pipeline behind `mlflow models serve`.

def _post(port: int, rows: list[dict]) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", method="POST",
                                 data=json.dumps({"dataframe_records": rows}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@contextmanager
def model_server(repo, uri: str):
    """`mlflow models serve -m <uri> --env-manager local` on a free 127.0.0.1 port, in its own process
    group (uvicorn runs as its child), always stopped; yields the port once /ping answers."""
    import os
    import signal
    import socket
    import subprocess
    import time
    import urllib.request

    from test_pipeline import _env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(_env(repo), MLFLOW_TRACKING_URI=f"sqlite:///{repo}/mlflow.db")
    log = open(repo / "serve.log", "wb")
    proc = subprocess.Popen(["mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
                             "-p", str(port)], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (repo / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, (repo / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def check_served_pipeline_model(repo, tmp_path, run) -> None:
    """For test_pipeline.py, on its tiny pipeline (tasks t1 pix2pix, t2 cyclegan, t3 pix2pix): `dvc repro`
    registered version 1 and a forced second report makes no new one; the served version equals
    `piggyback translate` for every task and generator, refuses every bad request with a 4xx and a
    message, and still answers afterwards. `run(cmd, repo)` runs a command in the repo."""
    import mlflow

    run(["dvc", "repro", "-f", "-s", "report"], repo)                 # same final checkpoint: no new version
    uri = f"sqlite:///{repo}/mlflow.db"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    assert [int(v.version) for v in client.search_model_versions("name = 'piggyback-gan'")] == [1]
    runs = client.search_runs([client.get_experiment_by_name("piggyback-gan").experiment_id])
    linked = [r for r in runs if r.data.tags.get("kind") != "evaluate"]         # training and pipeline runs
    assert len(linked) >= 4 and {r.data.tags.get("model.uri") for r in linked} == {"models:/piggyback-gan/1"}

    (tmp_path / "in").mkdir()
    noise(SIDE, SIDE, seed=3).save(tmp_path / "in" / "x.png")
    image = png_b64(Image.open(tmp_path / "in" / "x.png"))
    cases = [("t1", "G_A"), ("t2", "G_A"), ("t2", "G_B"), ("t3", "G_A")]
    with model_server(repo, "models:/piggyback-gan/1") as port:
        code, body = _post(port, [{"task": t, "generator": w, "image": image} for t, w in cases])
        assert code == 200, body
        for (task, which), row in zip(cases, body["predictions"]):
            assert (row["width"], row["height"]) == (SIDE, SIDE)
            (path,) = translate_folder(repo / "models" / "t3", task, tmp_path / "in", tmp_path / f"{task}{which}",
                                       which=which, device="cpu")
            assert np.abs(decode(row["image"]) - np.array(Image.open(path), dtype=np.int16)).max() <= 1, (task, which)
        for name, rows, words in BAD_REQUESTS:
            rows = [{**r, "task": "t1"} if r.get("task") == "p" else r for r in bad_rows(rows)]
            code, body = _post(port, rows)
            assert 400 <= code < 500 and words in body.get("message", ""), (name, code, body)
        code, body = _post(port, [{"task": "t1", "image": image}])
        assert code == 200 and len(body["predictions"]) == 1
