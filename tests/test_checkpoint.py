"""Lifelong checkpoints: exact round trip, metadata, and clear errors for damaged files."""
import json

import pytest
import torch

from piggyback import CheckpointError, GeneratorConfig, LifelongModel, check_compatible, load_lifelong, save_lifelong
from piggyback.checkpoint import load_probes, meta_digest
from piggyback.config import ModelConfig

pytestmark = pytest.mark.usefixtures("single_thread")

CFG = GeneratorConfig(netG="unet_128", ngf=2, norm="batch", use_dropout=True, lam_overrides={"last": 1.0})


@pytest.fixture(scope="module")
def trained():
    """Three tasks (pix2pix, cyclegan, pix2pix) with every tensor moved away from its init."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                    # as the `single_thread` fixture (module scope here)
    model = LifelongModel(CFG)
    for name, mode in (("a", "pix2pix"), ("b", "cyclegan"), ("c", "pix2pix")):
        nets = model.add_task(name, mode, dataset=f"ds_{name}")
        with torch.no_grad():
            for net in nets.values():
                for p in net.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
                net(torch.randn(2, 3, 128, 128))        # BatchNorm running statistics move
        model.finish_task(epochs=2, probe_sha256="0" * 64)
    torch.set_num_threads(threads)
    return model


def _outputs(model, x):
    out = {}
    with torch.no_grad():
        for r in model.tasks:
            for which in r["index"]:
                out[r["name"], which] = model.generator(r["name"], which)(x)
    return out


def test_round_trip_reproduces_every_task_exactly(trained, tmp_path):
    x = torch.randn(1, 3, 128, 128)
    probes = {"a": {"input": x, "output": torch.ones(1)}}
    out = save_lifelong(trained, tmp_path / "c", probes=probes, extra_meta={"git_sha": "abc"})
    assert sorted(p.name for p in out.iterdir()) == ["generators.pt", "meta.json", "probes.pt"]
    loaded = load_lifelong(out)
    before, after = _outputs(trained, x), _outputs(loaded, x)
    assert before.keys() == after.keys() and len(before) == 4
    assert all(torch.equal(before[k], after[k]) for k in before)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format_version"] == 1 and meta["config"]["netG"] == "unet_128" and meta["method"] == "piggyback"
    assert [(t["name"], t["mode"], t["direction"], t["index"]) for t in meta["tasks"]] == [
        ("a", "pix2pix", "AtoB", {"G_A": 1}), ("b", "cyclegan", "AtoB", {"G_A": 2, "G_B": 1}),
        ("c", "pix2pix", "AtoB", {"G_A": 3})]
    c = meta["tasks"][2]
    assert c["lambda"]["G_A"]["model.model.3"] == 1.0 and c["lambda"]["G_A"]["model.model.0"] == 0.25
    assert c["epochs"] == 2 and len(c["hashes"]["G_A"]) == 64 and c["stored_params"] > c["new_params"] > 0
    assert set(meta["files"]) == {"generators.pt", "probes.pt"} and meta["extra"] == {"git_sha": "abc"}
    assert loaded.meta["extra"]["git_sha"] == "abc" and loaded.tasks == trained.tasks
    assert torch.equal(load_probes(out)["a"]["input"], x)
    # Training goes on from a loaded checkpoint.
    loaded.add_task("d", "pix2pix")
    loaded.finish_task()
    assert torch.equal(_outputs(loaded, x)["a", "G_A"], before["a", "G_A"])


def test_empty_model_round_trip_and_no_overwrite(tmp_path):
    init = save_lifelong(LifelongModel(CFG, method="separate"), tmp_path / "init")
    model = load_lifelong(init)
    assert model.task_names() == [] and model.method == "separate" and model.config == CFG
    assert load_probes(init) is None
    with pytest.raises(FileExistsError, match=str(init)):
        save_lifelong(model, init)
    model.add_task("a", "pix2pix")
    with pytest.raises(RuntimeError, match="not finished"):
        save_lifelong(model, tmp_path / "x")


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["generators.pt", "probes.pt", "meta.json"])
@pytest.mark.parametrize("how", ["truncate", "bitflip"])
def test_damaged_files_raise_an_error_naming_the_file(trained, tmp_path, name, how):
    out = save_lifelong(trained, tmp_path / "c", probes={"a": torch.zeros(3)})
    _corrupt(out / name, how)
    with pytest.raises(CheckpointError, match=str(out / name).replace(".", r"\.")):
        load_lifelong(out)
        load_probes(out)


def test_edited_metadata_and_missing_files_are_caught(trained, tmp_path):
    out = save_lifelong(trained, tmp_path / "c")
    meta = json.loads((out / "meta.json").read_text())
    meta["tasks"][0]["epochs"] = 3
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="meta.json: content does not match its meta_sha256"):
        load_lifelong(out)

    def rewrite(meta):                          # a consistent edit: the tensor checks must catch it
        meta["meta_sha256"] = meta_digest(meta)
        (out / "meta.json").write_text(json.dumps(meta))

    meta["tasks"][0]["hashes"]["G_A"] = "f" * 64
    rewrite(meta)
    with pytest.raises(CheckpointError, match="task 'a' \\(G_A\\) do not match"):
        load_lifelong(out)
    meta["tasks"][0]["hashes"] = trained.tasks[0]["hashes"]
    meta["banks"]["G_A"][1]["model.model.0"] = 1.0               # a shape the tensors do not have
    rewrite(meta)
    with pytest.raises(CheckpointError, match="generators.pt: G_A does not match meta.json"):
        load_lifelong(out)
    (out / "generators.pt").unlink()
    with pytest.raises(CheckpointError, match="generators.pt: missing"):
        load_lifelong(out)
    with pytest.raises(CheckpointError, match="meta.json: missing"):
        load_lifelong(tmp_path)


def test_check_compatible_names_the_differing_key(trained):
    ok = ModelConfig(netG="unet_128", ngf=2, norm="batch", use_dropout=True, lam_overrides={"last": 1.0}, ndf=8)
    check_compatible(trained, ok, method="piggyback")
    with pytest.raises(CheckpointError, match="model.ngf: the checkpoint was built with 2, params ask for 64"):
        check_compatible(trained, ModelConfig(netG="unet_128", norm="batch", use_dropout=True,
                                              lam_overrides={"last": 1.0}))
    with pytest.raises(CheckpointError, match="model.lam_overrides"):
        check_compatible(trained, ModelConfig(netG="unet_128", ngf=2, norm="batch", use_dropout=True))
    with pytest.raises(CheckpointError, match="train.method"):
        check_compatible(trained, ok, method="finetune")
