"""model/cpu_programs.py: the CPU runtime's compiled programs saved at one start and imported at the next, in
place of the language model's weights; and what happens when an entry is stale, damaged or cannot be written."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")  # before paddle is imported

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import openvino  # noqa: E402
import pytest  # noqa: E402

from model.cpu_decoder import HELD_PARAMETERS, CpuDecoder  # noqa: E402
from model.cpu_programs import ProgramStoreError  # noqa: E402
from model.loader import load_model  # noqa: E402
from model.cpu_engine import VQ_HELD_PARAMETERS, CpuVQDecoder  # noqa: E402
from model.cpu_vision import HELD_PARAMETERS as VISION_HELD_PARAMETERS  # noqa: E402
from model.cpu_vision import CpuVisionEncoder  # noqa: E402
from model.runtime.cpu import decoder_store, program_store  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "janus-tiny"


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A copy of janus-tiny's checkpoint folder (its files' times are part of an entry's key)."""
    folder = tmp_path / "janus-tiny"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(GOLDEN / name, folder / name)
    return folder


def hidden(decoder: CpuDecoder, model) -> np.ndarray:
    """A 7-token prompt, then one step on top of it, through `decoder` on a fresh cache."""
    rng = np.random.default_rng(3)
    size = model.config.language.hidden_size
    cache = model.new_cache(2, 16)
    first = decoder.forward_hidden(rng.standard_normal((2, 7, size)).astype(np.float32), cache, [0, 1], [0, 0])
    second = decoder.forward_hidden(rng.standard_normal((2, 1, size)).astype(np.float32), cache, [0, 1], [7, 7])
    return np.concatenate([first.numpy(), second.numpy()], axis=1)


def test_a_second_start_imports_the_programs_without_the_layer_weights(checkpoint, tmp_path):
    root = tmp_path / "programs"
    store = decoder_store(str(checkpoint), str(root), "exact")
    assert not store.complete()
    built_model = load_model(checkpoint)
    built = CpuDecoder(built_model, threads=2, release_eager=True, store=store)
    assert built.store is None and store.complete()
    assert built._file is store  # runs as imported from the file it saved: the eager layers were freed outright
    assert not built_model.language_model.model.layers[0].self_attn.qkv_proj.weight._is_initialized()
    assert [entry.name for entry in root.iterdir()] == [store.path.name]  # no temporary folder left behind
    want = hidden(built, built_model)

    again = decoder_store(str(checkpoint), str(root), "exact")
    assert again.path == store.path and again.complete()
    model = load_model(checkpoint, skip=HELD_PARAMETERS)
    layer = model.language_model.model.layers[0].self_attn.qkv_proj.weight
    assert not layer._is_initialized() and model.language_model.lm_head.weight._is_initialized()
    imported = CpuDecoder(model, threads=2, release_eager=True, store=again)
    assert imported.store is again and imported.weight_bytes == built.weight_bytes
    np.testing.assert_array_equal(hidden(imported, model), want)  # the same programs: the same bits


def test_an_entry_is_named_by_what_the_programs_depend_on(checkpoint, tmp_path):
    root = str(tmp_path / "programs")
    exact = decoder_store(str(checkpoint), root, "exact", threads=2)
    written = (checkpoint / "model.safetensors").stat().st_mtime_ns
    assert decoder_store(str(checkpoint), root, "int8", threads=2).path != exact.path
    os.utime(checkpoint / "model.safetensors", ns=(1, 1))  # a new checkpoint in the same place
    changed = decoder_store(str(checkpoint), root, "exact", threads=2)
    assert changed.path != exact.path and changed.key["checkpoint"][0] == exact.key["checkpoint"][0]
    os.utime(checkpoint / "model.safetensors", ns=(written, written))
    # Saving an entry removes those of the same checkpoint folder that can never be used again; those of other
    # settings stay.
    model = load_model(checkpoint)
    CpuDecoder(model, threads=2, store=exact)
    CpuDecoder(model, threads=1, store=(one_thread := decoder_store(str(checkpoint), root, "exact", threads=1)))
    assert exact.complete() and one_thread.complete() and one_thread.path != exact.path
    os.utime(checkpoint / "model.safetensors", ns=(2, 2))
    changed = decoder_store(str(checkpoint), root, "exact", threads=2)
    CpuDecoder(model, threads=2, store=changed)
    assert changed.complete() and not exact.path.exists() and not one_thread.path.exists()


def test_a_damaged_entry_is_discarded(checkpoint, tmp_path):
    root = str(tmp_path / "programs")
    model = load_model(checkpoint)
    CpuDecoder(model, threads=2, store=decoder_store(str(checkpoint), root, "exact"))
    store = decoder_store(str(checkpoint), root, "exact")
    probes = np.load(store.path / "probes.npz")
    np.savez(store.path / "probes.npz", *[probes[name] + 1 for name in probes.files])  # what the programs gave
    with pytest.raises(ProgramStoreError, match="do not give the outputs"):
        store.load(openvino.Core(), {"INFERENCE_NUM_THREADS": 2}, store.manifest()["programs"])
    assert not store.path.exists()

    # With the weights loaded, the decoder builds (and saves) again; without them, it says so.
    CpuDecoder(model, threads=2, store=store)
    assert store.complete()
    (store.path / "000.blob").write_bytes(b"not a program")
    skipped = load_model(checkpoint, skip=HELD_PARAMETERS)
    with pytest.raises(ProgramStoreError):
        CpuDecoder(skipped, threads=2, store=store)
    assert not store.complete()
    rebuilt = CpuDecoder(model, threads=2, store=store)
    assert rebuilt.store is None and store.complete()
    with pytest.raises(ProgramStoreError, match="programs saved"):  # another model's number of programs
        store.load(openvino.Core(), {"INFERENCE_NUM_THREADS": 2}, store.manifest()["programs"] + 1)
    assert not store.complete()


def test_an_entry_that_cannot_be_written_is_only_logged(checkpoint, tmp_path, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # the folder for the entries cannot be made under a file
    model = load_model(checkpoint)
    store = decoder_store(str(checkpoint), str(blocked / "programs"), "exact")
    decoder = CpuDecoder(model, threads=2, store=store)
    assert not store.complete() and "not saved" in caplog.text
    assert np.isfinite(hidden(decoder, model)).all()


def test_the_image_programs_are_imported_without_their_weights_and_checked_by_digest(checkpoint, tmp_path):
    """The image encoder and the VQ decoder (a probe of each takes seconds at Janus-1.3B's sizes) are checked by
    their blobs' digests: the same bits come back, and a changed blob is discarded."""
    root = str(tmp_path / "programs")
    model = load_model(checkpoint)
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 3, 384, 384)).astype(np.float32)
    codes = np.random.default_rng(1).integers(0, model.config.gen_vision.codebook_size, (2, 576))
    def store(program):
        return program_store(program, str(checkpoint), root, threads=2)

    built_vision = CpuVisionEncoder(model, threads=2, store=store("image encoder"))
    built_vq = CpuVQDecoder(model, threads=2, store=store("VQ decoder"))
    assert not built_vision.imported and not built_vq.imported
    assert built_vision.program.store is not None  # run from the saved file at once
    want = built_vision.encode(pixels), built_vq.decode(codes)

    skipped = load_model(checkpoint, skip=VISION_HELD_PARAMETERS + VQ_HELD_PARAMETERS)
    assert not skipped.vision_model.pos_embed._is_initialized()
    assert not skipped.gen_vision_model.post_quant_conv.weight._is_initialized()
    assert skipped.gen_vision_model.codebook.weight._is_initialized()  # the lookup stays eager
    vision = CpuVisionEncoder(skipped, threads=2, store=(stored := store("image encoder")))
    vq = CpuVQDecoder(skipped, threads=2, store=store("VQ decoder"))
    assert vision.imported and vision.program.store is stored and vq.imported and "sha256" in stored.manifest()
    np.testing.assert_array_equal(vision.encode(pixels), want[0])
    np.testing.assert_array_equal(vq.decode(codes), want[1])

    blob = stored.path / "000.blob"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(ProgramStoreError, match="digest"):
        CpuVisionEncoder(skipped, threads=2, store=stored)
    assert not stored.complete()
    rebuilt = CpuVisionEncoder(model, threads=2, store=stored)  # with its weights: built and saved again
    assert not rebuilt.imported and stored.complete()
    np.testing.assert_array_equal(rebuilt.encode(pixels), want[0])


def test_an_entry_keeps_small_arrays_beside_its_programs(checkpoint, tmp_path):
    store = program_store("VQ decoder", str(checkpoint), str(tmp_path / "programs"), threads=2)
    palette = np.arange(12, dtype=np.uint8).reshape(4, 3)
    assert not store.put_array("palette", palette)  # no entry yet
    CpuVQDecoder(load_model(checkpoint), threads=2, store=store)
    assert store.array("palette") is None and store.put_array("palette", palette)
    np.testing.assert_array_equal(store.array("palette"), palette)
    (store.path / "palette.npy").write_bytes(b"damaged")
    assert store.array("palette") is None
