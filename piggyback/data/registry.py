"""Known public datasets: the CycleGAN and pix2pix archives served by Berkeley (junyanz download scripts).

URLs follow junyanz `datasets/download_cyclegan_dataset.sh` (``.../cyclegan/datasets/NAME.zip``, unpaired
trainA/trainB/testA/testB) and `download_pix2pix_dataset.sh` (``.../pix2pix/datasets/NAME.tar.gz``, paired
train/val/test with A|B side by side). No official checksums exist: the download stage records the SHA-256
of the first download and verifies it on reuse (see `piggyback.data.download`).
"""
from __future__ import annotations

from dataclasses import dataclass

CYCLEGAN_URL = "http://efrosgans.eecs.berkeley.edu/cyclegan/datasets/{name}.zip"
PIX2PIX_URL = "http://efrosgans.eecs.berkeley.edu/pix2pix/datasets/{name}.tar.gz"


@dataclass(frozen=True)
class DatasetSpec:
    """One downloadable dataset.

    Attributes:
        name: archive name (``horse2zebra``); the same name may exist in both frameworks (facades, maps).
        framework: "cyclegan" or "pix2pix"; which registry the entry belongs to.
        url: where the archive is served.
        archive: "zip" or "tar.gz".
        layout: "unpaired" (trainA/trainB/testA/testB) or "paired" (train/val/test, A|B side by side).
        note: what A and B are, and the usual training direction when it is not AtoB.
    """

    name: str
    framework: str
    url: str
    archive: str
    layout: str
    note: str = ""

    @property
    def filename(self) -> str:
        """The archive's file name, as stored under data/downloads/."""
        return archive_filename(self.url)


def _cyclegan(name: str, note: str) -> DatasetSpec:
    return DatasetSpec(name, "cyclegan", CYCLEGAN_URL.format(name=name), "zip", "unpaired", note)


def _pix2pix(name: str, note: str) -> DatasetSpec:
    return DatasetSpec(name, "pix2pix", PIX2PIX_URL.format(name=name), "tar.gz", "paired", note)


# Counts are the training-set sizes quoted by junyanz docs/datasets.md; the archives differ slightly
# (junyanz's download scripts), so nothing below is used as a check, only as documentation.
CYCLEGAN_DATASETS: dict[str, DatasetSpec] = {s.name: s for s in [
    _cyclegan("maps", "A: aerial photo, B: Google map (1096 train); CycleGAN's photo<->map"),
    _cyclegan("facades", "A: facade photo, B: CMP label map (400 train); label->photo is BtoA"),
    _cyclegan("vangogh2photo", "A: Van Gogh paintings (401), B: landscape photos"),
    _cyclegan("horse2zebra", "A: horses (about 1067 train, 120 test), B: zebras (1334 / 140)"),
    _cyclegan("monet2photo", "A: Monet paintings (1072 train, 121 test), B: photos (6287 / 751)"),
    _cyclegan("apple2orange", "A: apples (996 train), B: oranges (1020 train)"),
    _cyclegan("summer2winter_yosemite", "A: Yosemite in summer (1273), B: in winter (854)"),
    _cyclegan("cezanne2photo", "A: Cezanne paintings (584), B: landscape photos"),
    _cyclegan("ukiyoe2photo", "A: Ukiyo-e prints (1433), B: landscape photos"),
    _cyclegan("iphone2dslr_flower", "A: iPhone flower photos (1813), B: DSLR shallow depth of field (3316)"),
]}

PIX2PIX_DATASETS: dict[str, DatasetSpec] = {s.name: s for s in [
    _pix2pix("facades", "A: facade photo, B: label map (400 train, 100 val, 106 test); label->photo is BtoA"),
    _pix2pix("maps", "A: aerial photo, B: map (1096 train, 1098 val, no test: val is used as test)"),
    _pix2pix("edges2shoes", "A: HED edges, B: shoe photo (about 50k train, 200 val as test)"),
    _pix2pix("edges2handbags", "A: HED edges, B: handbag photo (about 137k train, 200 val as test)"),
    _pix2pix("night2day", "A: night, B: day, same webcam (about 17.8k train; Transient Attributes)"),
]}

REGISTRY: dict[str, dict[str, DatasetSpec]] = {"cyclegan": CYCLEGAN_DATASETS, "pix2pix": PIX2PIX_DATASETS}


def archive_filename(url: str) -> str:
    """Last path component of `url` without query or fragment (``horse2zebra.zip``)."""
    path = url.split("#", 1)[0].split("?", 1)[0].rstrip("/")
    name = path.rsplit("/", 1)[-1]
    if not name or name in (".", ".."):
        raise ValueError(f"cannot derive an archive file name from URL {url!r}")
    return name


def lookup(framework: str, name: str, url: str | None = None) -> DatasetSpec:
    """The registry entry `name` of `framework`; `url` (a mirror) overrides the registered URL.

    Raises:
        KeyError: unknown framework or name; the message lists the known names.
    """
    if framework not in REGISTRY:
        raise KeyError(f"unknown dataset framework {framework!r} (known: {', '.join(REGISTRY)})")
    table = REGISTRY[framework]
    if name not in table and not url:
        raise KeyError(f"unknown {framework} dataset {name!r} (known: {', '.join(sorted(table))}); "
                       "give datasets.<key>.url for an archive that is not in the registry")
    if name not in table:  # an archive in the same layout from elsewhere (a mirror, the `mini` test sets)
        layout = "unpaired" if framework == "cyclegan" else "paired"
        spec = DatasetSpec(name, framework, url, "zip", layout, "not in the registry: URL from params.yaml")
    else:
        spec = table[name]
    if url:
        archive = "zip" if archive_filename(url).lower().endswith(".zip") else "tar.gz"
        spec = DatasetSpec(spec.name, spec.framework, url, archive, spec.layout, spec.note)
    return spec
