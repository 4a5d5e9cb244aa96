"""The lifelong generator as an MLflow pyfunc model: one deployment serves every task of one checkpoint.

The report stage logs the final checkpoint as the pyfunc model ``model`` of the pipeline run and registers
it as a version of ``mlflow.registered_model`` (`publish_model`); ``mlflow models serve -m
models:/<name>/<version> --env-manager local`` then answers rows of {task, generator, image} with the
translated image. The inference path is the one ``piggyback translate`` uses (`translate.load_input_image`,
`translate.run_generator`); the only difference is that served images are first resized as the task's
test transform does (bicubic to data.crop_size), since a client's image may have any size.

A bad row is an `MlflowException` with INVALID_PARAMETER_VALUE: the scoring server answers HTTP 400 with
the message and goes on serving. Every row is checked and decoded before any network runs.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import threading
from typing import Any, Optional

import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from PIL import Image

from .checkpoint import load_lifelong
from .translate import default_device, load_input_image, run_generator, to_uint8

# Request limits (README, "Serving the model"). A request over them is refused before any decoding work.
MAX_ROWS = 64                       # images per request
MAX_REQUEST_BYTES = 32 * 2**20      # sum of the base64 strings of one request
MAX_IMAGE_BYTES = 16 * 2**20        # one decoded image file
MAX_PIXELS = 4096 * 4096            # one image's width x height (decompression bombs stop here)
BATCH_SIZE = 16                     # images per forward pass
FORMATS = ("PNG", "JPEG")
SIZES = ("input", "task")           # output at the input's size (default) or at the task's size
EXIF_ORIENTATION = 0x0112


def _bad(row: Optional[int], message: str) -> MlflowException:
    """A client error; the scoring server turns it into HTTP 400 with this message."""
    where = f"row {row}: " if row is not None else ""
    return MlflowException(f"{where}{message}", error_code=INVALID_PARAMETER_VALUE)


def _text(value: Any) -> Optional[str]:
    """A cell as a string; None for a missing cell (None / NaN where a column is absent in some rows)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value if isinstance(value, str) else str(value)


def decode_image(b64: str, row: int) -> tuple[bytes, tuple[int, int]]:
    """A base64 PNG/JPEG -> (file bytes, (width, height)); an error for anything else, before decoding pixels."""
    if len(b64) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise _bad(row, f"image: larger than the limit of {MAX_IMAGE_BYTES // 2**20} MiB per image")
    try:
        data = base64.b64decode(b64.partition(",")[2] if b64.startswith("data:") else b64, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(row, "image: not valid base64") from None
    try:
        with Image.open(io.BytesIO(data)) as img:   # reads the header only: the size is known before decoding
            fmt, size = img.format, img.size
            if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                size = size[::-1]                       # turned by 90 degrees, as a viewer shows it
    except Image.DecompressionBombError:
        raise _bad(row, f"image: its declared size is over the limit of {MAX_PIXELS:,} pixels per image") from None
    except (OSError, ValueError, SyntaxError):
        raise _bad(row, "image: not a PNG or JPEG image") from None
    if fmt not in FORMATS:
        raise _bad(row, f"image: {fmt} is not accepted (send {' or '.join(FORMATS)})")
    if size[0] * size[1] > MAX_PIXELS:
        raise _bad(row, f"image: {size[0]}x{size[1]} pixels is over the limit of {MAX_PIXELS:,} pixels per image")
    return data, size


class LifelongGenerator(PythonModel):
    """Every task of a lifelong checkpoint behind one `predict`: rows {task, generator, image, size}.

    Artifacts: ``checkpoint`` (the checkpoint folder), ``serving`` (JSON: ``image_size``, the task's test size).
    """

    def load_context(self, context: Any) -> None:
        self.model = load_lifelong(context.artifacts["checkpoint"])
        with open(context.artifacts["serving"]) as f:
            self.image_size = int(json.load(f)["image_size"])
        self.device = default_device()
        self._nets: dict[tuple[str, str], torch.nn.Module] = {}
        self._lock = threading.Lock()                # the scoring server predicts in several threads

    def _net(self, task: str, which: str) -> torch.nn.Module:
        """The task's generator, materialized once (as `piggyback translate` does) and kept."""
        with self._lock:
            if (task, which) not in self._nets:
                self._nets[task, which] = self.model.materialize(task, which).to(self.device).eval()
            return self._nets[task, which]

    def _generator(self, task: Optional[str], which: Optional[str], row: int) -> tuple[str, str]:
        """(task, "G_A"|"G_B") of a row; `which` may also be the task's direction (G_A) or its reverse (G_B)."""
        names = self.model.task_names()
        if task not in names:
            raise _bad(row, f"task: {task!r} is not a task of this model (tasks: {', '.join(names)})")
        record = self.model.task(task)
        which = which or "G_A"
        if which in ("AtoB", "BtoA"):
            which = "G_A" if which == record["direction"] else "G_B"
        if which not in ("G_A", "G_B"):
            raise _bad(row, f"generator: {which!r} is not G_A, G_B, AtoB or BtoA")
        if which not in record["index"]:
            raise _bad(row, f"generator: task {task!r} is a {record['mode']} task: it has only "
                            f"{', '.join(sorted(record['index']))} (G_B, the reverse, exists for cyclegan tasks)")
        return task, which

    def _parse(self, frame: pd.DataFrame) -> list[dict]:
        """Check every row and decode its image at the task's size; nothing runs until all rows are good."""
        if not isinstance(frame, pd.DataFrame):
            raise _bad(None, f"expected a table of rows (task, generator, image), got {type(frame).__name__}")
        missing = [c for c in ("task", "image") if c not in frame.columns]
        if missing:
            raise _bad(None, f"missing field(s) {', '.join(missing)}: each row needs task and image "
                             "(generator and size are optional)")
        if not 0 < len(frame) <= MAX_ROWS:
            raise _bad(None, f"{len(frame)} rows: send 1 to {MAX_ROWS} images per request")
        images = [_text(v) for v in frame["image"]]
        total = sum(len(b) for b in images if b)
        if total > MAX_REQUEST_BYTES:
            raise _bad(None, f"request images total {total:,} base64 bytes, over the limit of {MAX_REQUEST_BYTES:,}")
        rows = []
        for i, rec in enumerate(frame.to_dict("records")):
            task, which = self._generator(_text(rec.get("task")), _text(rec.get("generator")), i)
            size = _text(rec.get("size")) or "input"
            if size not in SIZES:
                raise _bad(i, f"size: {size!r} is not one of {', '.join(SIZES)}")
            if not images[i]:
                raise _bad(i, "image: missing (a base64 PNG or JPEG)")
            data, wh = decode_image(images[i], i)
            try:
                x = load_input_image(io.BytesIO(data), self.model.config.input_nc, self.image_size)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                raise _bad(i, "image: the PNG/JPEG data is damaged (cannot decode its pixels)") from None
            rows.append({"task": task, "which": which, "x": x, "out_size": wh if size == "input" else None})
        return rows

    def predict(self, context: Any, model_input, params: Optional[dict] = None) -> pd.DataFrame:  # noqa: ANN001
        """Rows {task, generator?, image, size?} -> rows {image (base64 PNG), width, height}, in order.

        (`model_input` has no type hint on purpose: MLflow would then expect type-hint based payloads.)
        """
        rows = self._parse(model_input)
        out: list[Optional[dict]] = [None] * len(rows)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault((r["task"], r["which"]), []).append(i)
        for (task, which), idx in groups.items():
            net = self._net(task, which)
            for start in range(0, len(idx), BATCH_SIZE):
                chunk = idx[start:start + BATCH_SIZE]
                y = run_generator(net, torch.cat([rows[i]["x"] for i in chunk]))
                for i, pixels in zip(chunk, to_uint8(y)):
                    out[i] = _png_row(pixels, rows[i]["out_size"])
        return pd.DataFrame(out, columns=["image", "width", "height"])


def _png_row(pixels: Any, size: Optional[tuple[int, int]]) -> dict:
    """uint8 (H, W, C) -> {image: base64 PNG, width, height}, resized back to `size` (w, h) when given (bicubic)."""
    img = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    if size is not None and img.size != tuple(size):
        img = img.resize(tuple(size), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"image": base64.b64encode(buf.getvalue()).decode("ascii"), "width": img.width, "height": img.height}
