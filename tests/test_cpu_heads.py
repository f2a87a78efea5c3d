"""model/cpu_heads.py: the output heads as OpenVINO programs, imported from a program store, against eager."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")  # before paddle is imported

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from model.cpu_engine import EngineUnavailable  # noqa: E402
from model.cpu_heads import HELD_PARAMETERS, CpuHeads  # noqa: E402
from model.cpu_programs import ProgramStoreError  # noqa: E402
from model.loader import load_model  # noqa: E402
from model.runtime.cpu import program_store  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "janus-tiny"


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    folder = tmp_path / "janus-tiny"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(GOLDEN / name, folder / name)
    return folder


def hidden_rows(model, rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, model.config.language.hidden_size)).astype(np.float32)


def test_heads_give_eager_logits_at_every_row_count_once_the_eager_heads_are_freed(checkpoint, tmp_path):
    """Every row count from 1 to 24 (janus-tiny's image head, compiled from eager memory that was then dropped,
    read that memory from 7 rows on: model/cpu_memory.py); then a second start imports the same programs
    without loading the heads' weights."""
    reference = load_model(checkpoint)
    model = load_model(checkpoint)
    store = program_store("heads", str(checkpoint), str(tmp_path / "programs"), threads=2)
    heads = CpuHeads(model, store, threads=2)
    assert not heads.imported and store.complete()  # built now, run as imported from the saved file
    assert not model.language_model.lm_head.weight._is_initialized()  # freed
    assert not model.gen_head.vision_head.weight._is_initialized()
    got = {}
    for rows in range(1, 25):
        x = hidden_rows(reference, rows, rows)
        got[rows] = heads.text_logits(x).numpy(), heads.image_logits(x).numpy()
        for mine, theirs in zip(got[rows], (reference.text_logits(x).numpy(), reference.image_logits(x).numpy())):
            np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())
    batched = hidden_rows(reference, 6, 0).reshape(2, 3, -1)  # leading dimensions are kept
    assert heads.text_logits(batched).shape == [2, 3, reference.config.language.vocab_size]
    assert heads.image_logits(np.zeros((0, batched.shape[-1]), np.float32)).shape[0] == 0

    skipped = load_model(checkpoint, skip=HELD_PARAMETERS)
    assert not skipped.language_model.lm_head.weight._is_initialized()
    again = CpuHeads(skipped, program_store("heads", str(checkpoint), str(tmp_path / "programs"), threads=2), threads=2)
    assert again.imported
    for rows in (1, 7, 24):
        x = hidden_rows(reference, rows, rows)
        np.testing.assert_array_equal(again.text_logits(x).numpy(), got[rows][0])
        np.testing.assert_array_equal(again.image_logits(x).numpy(), got[rows][1])


def test_without_a_usable_store_the_heads_stay_eager(checkpoint, tmp_path):
    model = load_model(checkpoint)
    with pytest.raises(EngineUnavailable, match="program store"):
        CpuHeads(model, None)
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # the store's folder cannot be made under a file
    with pytest.raises(EngineUnavailable, match="could not be saved"):
        CpuHeads(model, program_store("heads", str(checkpoint), str(blocked / "programs"), threads=2), threads=2)
    assert model.language_model.lm_head.weight._is_initialized()  # the eager heads serve

    # A damaged entry: eager heads when their weights were loaded, else the worker must load them.
    store = program_store("heads", str(checkpoint), str(tmp_path / "programs"), threads=2)
    CpuHeads(load_model(checkpoint), store, threads=2)
    (store.path / "001.blob").write_bytes(b"not a program")
    with pytest.raises(EngineUnavailable, match="could not be imported"):
        CpuHeads(model, store, threads=2)
    assert not store.complete() and model.language_model.lm_head.weight._is_initialized()
    CpuHeads(load_model(checkpoint), store, threads=2)
    (store.path / "001.blob").write_bytes(b"not a program")
    with pytest.raises(ProgramStoreError):
        CpuHeads(load_model(checkpoint, skip=HELD_PARAMETERS), store, threads=2)
