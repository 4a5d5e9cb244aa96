"""Data for every task: dataset registry, download, safe extraction, preparation, embedded suite, loaders.

README.md, "Datasets", and junyanz's data pipeline. Names are re-exported lazily (PEP 562), so that
``import piggyback.data.download`` does not import torch; see each module for the details.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "registry": ["DatasetSpec", "CYCLEGAN_DATASETS", "PIX2PIX_DATASETS", "REGISTRY", "lookup"],
    "download": ["DownloadError", "DownloadTimeoutError", "OfflineError", "ChecksumError", "download_file",
                 "fetch_archive", "fetch_dataset"],
    "archive": ["ArchiveError", "UnsafeArchiveError", "safe_extract"],
    "prepare": ["LayoutError", "BadImagesError", "IMAGE_EXTENSIONS", "detect_layout", "list_images",
                "prepare_dataset"],
    "cityscapes": ["CityscapesMissingError", "build_cityscapes"],
    "embedded": ["EMBEDDED_KINDS", "generate_embedded", "render_pair"],
    "datasets": ["UnalignedDataset", "AlignedDataset", "TestSet", "make_train_dataset", "target_images",
                 "build_loader", "collate_test", "dataset_layout"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'piggyback.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"piggyback.data.{_WHERE[name]}"), name)
