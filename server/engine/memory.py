"""How big a worker's KV cache is: sized from the memory its device has free once the model is loaded.

A worker measures what is free after its weights and programs are in memory (host RAM, or its
GPU's memory), gives `--memory-fraction` of that to the cache, and shares it out in rows of one
length (model/llama.py KVCache: every row holds `row_length` positions). `--max-batch-rows` and
`--max-cache-tokens` only bound the result. Every row must hold the longest request the server
accepts (one image and a question, plus `--max-new-tokens-limit` new tokens), and there must be
two rows, the one image's two halves of guidance (one with `--max-batch-rows 1`, which serves
understanding alone); a cache that cannot is refused with the numbers.

Pure Python: the worker passes in what it measured (host_available_bytes here; GPU figures from
the device), so that the sizing is tested on any memory sizes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from server.engine.types import IMAGE_TOKENS

# Positions an understanding request takes besides its answer: one image and a short question in the
# chat template (janus-tiny's and Janus-1.3B's templates put 20-30 tokens around one image).
ONE_IMAGE_PROMPT = IMAGE_TOKENS + 64
BLOCK = 64  # the cache's positions come in blocks of this many (model/llama.py KVCache)
MIN_ROWS = 2  # one image: its prompt twice, with and without the text (classifier-free guidance)


class CacheDoesNotFit(RuntimeError):
    """The smallest cache this configuration needs is more than the memory allows."""


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


@dataclasses.dataclass(frozen=True)
class CachePlan:
    rows: int
    row_length: int  # positions per row: one request's prompt and new tokens
    bytes_per_position: int
    free_bytes: int  # measured before the cache was allocated
    loaded_bytes: int  # what the worker held then (weights and programs)

    @property
    def positions(self) -> int:
        return self.rows * self.row_length

    @property
    def bytes(self) -> int:
        return self.positions * self.bytes_per_position

    @property
    def images_at_once(self) -> int:
        return self.rows // MIN_ROWS

    def info(self) -> dict:
        """As /ready and /metrics report it."""
        return {"bytes": self.bytes, "positions": self.positions, "rows": self.rows, "row_length": self.row_length,
                "bytes_per_position": self.bytes_per_position, "images_at_once": self.images_at_once,
                "understanding_at_once": self.rows, "free_bytes": self.free_bytes, "loaded_bytes": self.loaded_bytes}

    def describe(self) -> str:
        return (f"KV cache {gb(self.bytes)}: {self.rows} rows x {self.row_length} positions "
                f"({self.bytes_per_position // 1024} KiB each); {plural(self.images_at_once, 'image')} or "
                f"{plural(self.rows, 'understanding request')} at once; {gb(self.free_bytes)} was free after loading "
                f"{gb(self.loaded_bytes)}")


def plural(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def bytes_per_position(layers: int, kv_heads: int, head_dim: int, element_bytes: int) -> int:
    """A key and a value for every layer."""
    return 2 * layers * kv_heads * head_dim * element_bytes


def plan_cache(*, free_bytes: int, loaded_bytes: int, fraction: float, bytes_per_position: int,
               max_new_tokens: int, max_context: int, max_rows: int, max_positions: int | None = None) -> CachePlan:
    """Rows and positions per row for `fraction` of `free_bytes`.

    The shortest row holds one image and a question plus `max_new_tokens` (at most the model's
    `max_context`). As many rows of that length as fit, up to `max_rows`; then the rows are made as long as
    the budget allows (up to `max_context`), which gives longer prompts room. `max_positions` bounds
    rows x length."""
    budget = int(max(0, free_bytes) * fraction) // bytes_per_position
    if max_positions:
        budget = min(budget, max_positions)
    shortest = min(round_up(ONE_IMAGE_PROMPT + max_new_tokens, BLOCK), max_context)
    rows = min(max_rows, budget // shortest)
    fewest = min(MIN_ROWS, max_rows)  # --max-batch-rows 1 serves understanding alone
    if rows < fewest:
        need = fewest * shortest * bytes_per_position
        given = budget * bytes_per_position
        bound = f"--max-cache-tokens {max_positions}" if max_positions and max_positions < fewest * shortest else None
        what = "one image, or an understanding request" if fewest == MIN_ROWS else "an understanding request"
        raise CacheDoesNotFit(
            f"the KV cache needs at least {gb(need)} ({plural(fewest, 'row')} x {shortest} positions: {what} with an "
            f"image and up to {max_new_tokens} new tokens); "
            + (f"{bound} allows {gb(given)}; raise it" if bound else
               f"{gb(free_bytes)} is free after loading the model ({gb(loaded_bytes)}), and --memory-fraction "
               f"{fraction:g} gives the cache {gb(given)}; lower --max-new-tokens-limit, raise --memory-fraction "
               f"or use a machine with more memory"))
    length = min(max_context, budget // rows // BLOCK * BLOCK)
    return CachePlan(rows=rows, row_length=max(length, shortest), bytes_per_position=bytes_per_position,
                     free_bytes=free_bytes, loaded_bytes=loaded_bytes)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---- host memory

def host_available_bytes(root: str = "/") -> int:
    """Memory a new allocation of this process can take: MemAvailable, or less where this process's
    control group is limited (a container's memory limit), less what the group already holds and cannot
    give back (its usage less its inactive file pages)."""
    available = meminfo(Path(root) / "proc/meminfo")["MemAvailable"]
    room = cgroup_room(Path(root))
    return min(available, room) if room is not None else available


def meminfo(path: Path) -> dict[str, int]:
    """/proc/meminfo in bytes."""
    fields = {}
    for line in path.read_text().splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if parts:
            fields[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return fields


def cgroup_room(root: Path) -> int | None:
    """The tightest limit among this process's memory control group and its ancestors, less that group's
    unreclaimable usage; None where no group is limited. cgroup v2 (memory.max) and v1
    (memory.limit_in_bytes)."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base, limit_file, usage_file, inactive = root / "sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):
            base, limit_file, usage_file, inactive = (root / "sys/fs/cgroup/memory", "memory.limit_in_bytes",
                                                      "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        folder = base / path.lstrip("/")
        while True:
            room = group_room(folder, limit_file, usage_file, inactive)
            if room is not None:
                rooms.append(room)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return min(rooms) if rooms else None


# Limits at or above this are "no limit" (cgroup v1 writes 2**63 rounded down to a page).
NO_LIMIT = 1 << 60


def group_room(folder: Path, limit_file: str, usage_file: str, inactive: str) -> int | None:
    try:
        raw = (folder / limit_file).read_text().strip()
    except OSError:
        return None
    if raw == "max" or int(raw) >= NO_LIMIT:
        return None
    usage = int((folder / usage_file).read_text())
    try:
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
        usage -= int(stat.get(inactive, 0))
    except (OSError, ValueError):
        pass
    return max(0, int(raw) - usage)


def resident_bytes(pid: int | str = "self", peak: bool = False) -> int | None:
    """A process's resident memory (VmRSS), or its peak (VmHWM); None once it is gone."""
    key = "VmHWM:" if peak else "VmRSS:"
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None
