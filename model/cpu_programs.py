"""Compiled OpenVINO programs kept on disk, so that a later start imports them instead of building (CPU).

Building the language model's programs (model/cpu_decoder.py) needs its weights read from the
checkpoint, then compiled; at Janus-1.3B's sizes that is most of a worker's start. The first start
exports each compiled program (OpenVINO's own blob: the program with its packed weights) into an
entry of a folder; a later start with the same entry need not read those weights at all
(loader.load_model's `skip`) and imports the blobs instead.

An entry is named by a digest of everything its programs depend on (`ProgramStore.key`): the
checkpoint's weight files (names, sizes, modification times), the precision and thread count, the
OpenVINO version, the CPU's capabilities and model name, and the source of the module that builds
the programs. Any change gives a new entry; when one is written, the entries of the same checkpoint
folder that no start can use again (other files there, other code, OpenVINO or CPU) are removed. An
entry is written into a temporary folder and renamed into place once whole (its manifest.json last),
so a start that dies halfway leaves no entry.

Imports map each blob into memory (np.memmap, copy-on-write): OpenVINO keeps the imported program's
original constants alive beside the packed copy it computes with, as after a compile
(model/cpu_memory.py). Here those constants are pages of the file: they are dropped after the
import and, unlike a compile's, could be read back from the file if OpenVINO ever needed them.
Every imported program is then checked: by default it must give exactly the outputs it gave when it
was exported (probe inputs, model/cpu_memory.snapshot); an entry saved without probe outputs (for
programs whose probe would take seconds: the image encoder, the VQ decoder) is checked by its blobs'
SHA-256 digests instead, before the import (about 0.6 s per GB). If the check fails, or anything else
does, the entry is discarded and the caller builds from the weights.

An entry may also keep small arrays computed from its programs (`put_array`, `array`: the preview
palette beside the VQ decoder); a missing or unreadable one reads as None.

    store = ProgramStore.for_checkpoint(folder, cache_root, builder_sources, precision=..., threads=...)
    if store.complete(): requests, manifest = store.load(core, config, count)   # raises ProgramStoreError
    else: ...build...; store.save(compiled_models, snapshot)      # or snapshot None: checked by digests
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FORMAT = 1  # of an entry's layout; part of the key
MANIFEST = "manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".pdparams", ".bin", ".json")


class ProgramStoreError(RuntimeError):
    """An entry that could not be imported or did not give its recorded outputs."""


def checkpoint_fingerprint(folder: str | os.PathLike) -> list:
    """What identifies a checkpoint's contents without reading them: its weight and config files' names,
    sizes and modification times."""
    folder = Path(folder).resolve()
    files = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            stat = path.stat()
            files.append([path.name, stat.st_size, stat.st_mtime_ns])
    return [str(folder), files]


def cpu_identity() -> list:
    """The CPU's model name and OpenVINO's view of its capabilities: a blob is compiled for one kind."""
    from .cpu_decoder import cpu_capabilities

    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return [name, sorted(cpu_capabilities())]


class ProgramStore:
    """One entry of compiled programs under `root`, for the programs `key` describes."""

    def __init__(self, root: str | os.PathLike, key: dict):
        self.root = Path(root)
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        self.path = self.root / digest
        self._maps: list[np.ndarray] = []  # the blobs load() imported, mapped as long as their programs live

    @classmethod
    def for_checkpoint(cls, folder, root, builder_source, **settings) -> "ProgramStore":
        """`builder_source`: the source file (or a list of them) of the code that builds the programs."""
        import openvino

        sources = [Path(builder_source)] if isinstance(builder_source, (str, os.PathLike)) else \
            [Path(path) for path in builder_source]
        digest = hashlib.sha256()
        for source in sources:
            digest.update(source.read_bytes())
        return cls(root, {"format": FORMAT, "checkpoint": checkpoint_fingerprint(folder),
                          "builder": "+".join(source.name for source in sources),
                          "builder_sha256": digest.hexdigest(),
                          "openvino": openvino.__version__, "cpu": cpu_identity(), **settings})

    def complete(self) -> bool:
        return (self.path / MANIFEST).is_file()

    def manifest(self) -> dict:
        return json.loads((self.path / MANIFEST).read_text())

    def save(self, compiled: list, probes: list[np.ndarray] | None, extra: dict | None = None) -> bool:
        """Write the compiled programs and their probe outputs (None: their digests, to check them by) as this
        entry; False (logged) if it cannot be written (no space, no permission): serving goes on without it."""
        from .cpu_memory import trim_heap

        temp = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            temp = Path(tempfile.mkdtemp(prefix=".writing-", dir=self.root))
            sizes, digests = [], []
            for index, program in enumerate(compiled):
                blob = program.export_model().getbuffer()
                with open(temp / f"{index:03d}.blob", "wb") as f:
                    f.write(blob)
                sizes.append(blob.nbytes)
                if probes is None:
                    digests.append(hashlib.sha256(blob).hexdigest())
                del blob
            checks = {"sha256": digests} if probes is None else {}
            if probes is not None:
                np.savez(temp / "probes.npz", *probes)
            (temp / MANIFEST).write_text(json.dumps({"key": self.key, "programs": len(compiled), "bytes": sizes,
                                                     **checks, **(extra or {})}, indent=1))
            self._remove_stale()
            os.rename(temp, self.path)  # fails if another worker wrote the same entry meanwhile: theirs stays
            temp = None
            trim_heap()  # the exported blobs were whole copies in the heap (the worker's glibc keeps freed memory)
            log.info("compiled programs saved in %s (%.1f GB)", self.path, sum(sizes) / 1e9)
            return True
        except OSError as error:
            log.warning("compiled programs not saved in %s (%s); the next start builds them again", self.root, error)
            return False
        finally:
            if temp is not None:
                shutil.rmtree(temp, ignore_errors=True)

    def _remove_stale(self) -> None:
        """Entries of the same builder for the same checkpoint folder that no start can use again: made from
        other files there, by other code, OpenVINO or CPU (those of other settings, precision or threads, stay)."""
        lasting = ("checkpoint", "builder_sha256", "openvino", "cpu")
        for entry in self.root.iterdir():
            if entry == self.path or entry.name.startswith(".") or not (entry / MANIFEST).is_file():
                continue
            try:
                key = json.loads((entry / MANIFEST).read_text())["key"]
                same_place = (key["checkpoint"][0], key["builder"]) == (self.key["checkpoint"][0], self.key["builder"])
                if same_place and any(key[name] != self.key[name] for name in lasting):
                    shutil.rmtree(entry, ignore_errors=True)
            except (OSError, ValueError, KeyError, TypeError):
                continue

    def load(self, core, config: dict | list[dict], programs: int) -> tuple[list, dict]:
        """The entry's `programs` programs as infer requests (compiled with `config`, or config[i] for the i-th),
        checked against their recorded outputs or digests, and its manifest (with what save() was given as
        `extra`); raises ProgramStoreError (after discarding the entry) if it holds another number, or any is
        missing, unreadable or different. The blobs stay mapped as long as this store lives: keep it beside
        the programs."""
        import openvino

        from .cpu_memory import drop_pages, same_outputs

        configs = config if isinstance(config, list) else [config] * programs
        try:
            manifest = self.manifest()
            if manifest["programs"] != programs:
                raise ProgramStoreError(f"{manifest['programs']} programs saved, {programs} wanted")
            maps, requests = [], []
            for index in range(manifest["programs"]):
                blob = np.memmap(self.path / f"{index:03d}.blob", dtype=np.uint8, mode="c")
                if "sha256" in manifest and hashlib.sha256(blob).hexdigest() != manifest["sha256"][index]:
                    raise ProgramStoreError(f"program {index} is not the one saved (its digest differs)")
                maps.append(blob)  # OpenVINO's constants point into it: kept mapped for the program's lifetime
                program = core.import_model(openvino.Tensor(blob, shared_memory=True), "CPU", configs[index])
                requests.append(program.create_infer_request())
                drop_pages([blob])  # one program at a time: the file's pages never add up to a second copy
            if "sha256" not in manifest:
                with np.load(self.path / "probes.npz") as recorded:
                    expected = [recorded[f"arr_{i}"] for i in range(len(recorded.files))]
                if not same_outputs(requests, expected):
                    raise ProgramStoreError("the imported programs do not give the outputs they gave when saved")
        except Exception as error:  # noqa: BLE001 - whatever went wrong, the entry is not to be used
            self.discard()
            if isinstance(error, ProgramStoreError):
                raise
            raise ProgramStoreError(f"{type(error).__name__}: {error}") from error
        self._maps = maps
        return requests, manifest

    def release_pages(self) -> None:
        """Give back the pages of the imported blobs that are resident again (read back from the file)."""
        from .cpu_memory import drop_pages

        drop_pages(self._maps)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def put_array(self, name: str, value: np.ndarray) -> bool:
        """Keep `value` in this (complete) entry as `name`; False if there is no entry or it cannot be written."""
        if not self.complete():
            return False
        temp = self.path / f".{name}.npy"
        try:
            np.save(temp, np.asarray(value))
            os.replace(temp, self.path / f"{name}.npy")
            return True
        except OSError as error:
            log.warning("%s not saved in %s (%s)", name, self.path, error)
            return False

    def array(self, name: str) -> np.ndarray | None:
        """The array put_array kept as `name`, or None."""
        try:
            return np.load(self.path / f"{name}.npy", allow_pickle=False)
        except (OSError, ValueError):
            return None
