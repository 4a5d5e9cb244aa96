"""The report stage's last step: the final checkpoint as an MLflow model on the pipeline run, registered.

`publish_model` logs `serving.LifelongGenerator` with the checkpoint folder as its artifact (artifact path
``model``), a signature, an input example, the project's pinned requirements and its code, registers it
as a new version of ``mlflow.registered_model`` with tags that say what it is, and links the task runs to
it. A checkpoint already registered as the newest version (same ``checkpoint.sha256``, the hash
meta.json keeps of every checkpoint file) is not logged again: the runs are linked to that version.
"""
from __future__ import annotations

import base64
import io
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from .checkpoint import read_meta
from .config import ConfigError, Params
from .tracking import default_tags, tracking_uri

ARTIFACT = "model"
HASH_TAG = "checkpoint.sha256"
PROJECT = "piggyback-gan"


def requirements() -> list[str]:
    """The project's pinned dependencies (pyproject.toml's [project] dependencies, as installed): explicit,
    so MLflow neither infers requirements nor needs the network."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires(PROJECT) or []
    except PackageNotFoundError as e:
        raise RuntimeError(f"{PROJECT} is not installed (`pip install -e .`): the model lists its requirements") from e
    return [r for r in reqs if "extra ==" not in r]


def signature() -> Any:
    """Input rows {task, generator?, image, size?} -> output rows {image, width, height}."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "task"), ColSpec("string", "generator", required=False),
                       ColSpec("string", "image"), ColSpec("string", "size", required=False)]),
        outputs=Schema([ColSpec("string", "image"), ColSpec("long", "width"), ColSpec("long", "height")]))


def input_example(task: str, side: int) -> Any:
    """One row: a mid-grey PNG of the task's size for the first task's G_A."""
    import pandas as pd
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (128, 128, 128)).save(buf, format="PNG")
    return pd.DataFrame([{"task": task, "generator": "G_A", "image": base64.b64encode(buf.getvalue()).decode("ascii"),
                          "size": "input"}])


def version_tags(params: Params, meta: dict) -> dict[str, str]:
    """What a registered version is: its tasks and modes, method, lambda, git commit, DVC experiment, hash."""
    tags = {"tasks": ",".join(f"{t['name']}:{t['mode']}" for t in meta["tasks"]), "method": meta["method"],
            "lambda": str(params.model.lam), "image_size": str(params.data.crop_size),
            HASH_TAG: meta["meta_sha256"]}
    tags.update({f"lambda.{t['name']}": str(t.get("lam")) for t in meta["tasks"]})
    base = default_tags()
    tags["git.commit"], tags["dvc.exp_name"] = base.get("git.commit", "unknown"), base["dvc.exp_name"]
    return tags


def _latest_version(client: Any, name: str) -> Optional[Any]:
    found = client.search_model_versions(f"name = '{name}'", max_results=1, order_by=["version_number DESC"])
    return found[0] if found else None


@contextmanager
def _store(params: Params) -> Iterator[Any]:
    """A client of the project's store, which is also MLflow's global store meanwhile: `Model.log` and the
    registry resolve the store globally, not from a client. The previous global URI is restored."""
    import mlflow

    uri, before = tracking_uri(params.mlflow), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        mlflow.set_tracking_uri(before)


def _log(params: Params, ckpt: Path, meta: dict, run_id: str) -> Any:
    """Log the pyfunc model on run `run_id` (artifact path ``model``); returns MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import Model

    from . import serving

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "serving.json"
        config.write_text(json.dumps({"image_size": params.data.crop_size}))
        return Model.log(
            artifact_path=None, name=ARTIFACT, flavor=mlflow.pyfunc, run_id=run_id,
            python_model=serving.LifelongGenerator(), artifacts={"checkpoint": str(ckpt), "serving": str(config)},
            code_paths=[str(Path(serving.__file__).parent)],   # the model carries the code it runs
            signature=signature(), input_example=input_example(meta["tasks"][0]["name"], params.data.crop_size),
            pip_requirements=requirements())


def publish_model(params: Params, summary: dict, run_id: str) -> str:
    """Log and register the final checkpoint of `summary` on pipeline run `run_id`; link the task runs.

    Returns the model's URI (``models:/<name>/<version>``; ``models:/<model id>`` without registration).
    """
    name = params.mlflow.registered_model
    if name is not None and (not name.strip() or "'" in name):
        raise ConfigError(f"mlflow.registered_model: {name!r} is not a usable model name (null disables registration)")
    ckpt = Path(summary["final_checkpoint"])
    meta = read_meta(ckpt)
    tags = version_tags(params, meta)
    with _store(params) as client:
        latest = _latest_version(client, name) if name else None
        if latest is not None and all(latest.tags.get(k) == tags[k] for k in (HASH_TAG, "image_size")):
            uri = f"models:/{name}/{latest.version}"
            print(f"MLflow model: the final checkpoint is already {uri}; no new version")
        else:
            info = _log(params, ckpt, meta, run_id)
            uri = info.model_uri
            if name:
                _ensure_registered(client, name)
                version = client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=tags,
                                                      model_id=info.model_id)
                uri = f"models:/{name}/{version.version}"
            print(f"MLflow model: {uri} (serve it: mlflow models serve -m {uri} --env-manager local)")
        for rid in [run_id] + [r["mlflow_run_id"] for r in summary["tasks"] if r.get("mlflow_run_id")]:
            client.set_tag(rid, "model.uri", uri)      # the pipeline run and every task run link to the model
    return uri


def _ensure_registered(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)        # created by an earlier report
    except MlflowException:
        client.create_registered_model(name, description="Piggyback GAN lifelong generator: every task of one "
                                       "checkpoint (README, \"Serving the model\")")
