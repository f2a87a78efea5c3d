"""The KV cache's size from the memory that is free (server/engine/memory.py), on made-up memory figures."""
from pathlib import Path

import pytest

from model.config import JanusConfig
from server.engine.memory import (
    CacheDoesNotFit, bytes_per_position, cgroup_room, host_available_bytes, plan_cache,
)

GB = 10**9
GIB = 1 << 30


def cache_bytes_per_position(name: str, element_bytes: int) -> int:
    lm = JanusConfig.from_name(name).language
    return bytes_per_position(lm.num_hidden_layers, lm.num_key_value_heads, lm.head_dim, element_bytes)


def plan(name: str, element_bytes: int, free: float, loaded: float, **overrides):
    values = dict(free_bytes=int(free), loaded_bytes=int(loaded), fraction=0.7,
                  bytes_per_position=cache_bytes_per_position(name, element_bytes), max_new_tokens=2048,
                  max_context=JanusConfig.from_name(name).language.max_position_embeddings, max_rows=32)
    return plan_cache(**{**values, **overrides})


def test_bytes_per_position_of_the_known_models():
    # A key and a value per layer: 24 layers x 2048 wide for Janus-1.3B, 30 x 4096 for Janus-Pro-7B.
    assert cache_bytes_per_position("deepseek-ai/Janus-1.3B", 4) == 384 * 1024  # float32, on CPU
    assert cache_bytes_per_position("deepseek-ai/Janus-1.3B", 2) == 192 * 1024  # bf16, on GPU
    assert cache_bytes_per_position("deepseek-ai/Janus-Pro-7B", 2) == 480 * 1024


@pytest.mark.parametrize("what, args, rows, row_length", [
    # A 24 GiB CPU host: Janus-1.3B in float32 (8.6 GB) and its OpenVINO programs leave ~14.5 GB.
    ("cpu 24 GiB", ("deepseek-ai/Janus-1.3B", 4, 14.5 * GB, 11 * GB), 9, 2816),
    # The same host with a 16 GiB container limit: ~5 GB left after loading.
    ("cpu 16 GiB container", ("deepseek-ai/Janus-1.3B", 4, 5 * GB, 11 * GB), 3, 2944),
    # GPUs in bf16 (4.2 GB of weights): 16, 24 and 80 GB cards.
    ("gpu 16 GB", ("deepseek-ai/Janus-1.3B", 2, 10.8 * GB, 4.6 * GB), 14, 2688),
    ("gpu 24 GB", ("deepseek-ai/Janus-1.3B", 2, 18.8 * GB, 4.6 * GB), 24, 2752),
    ("gpu 80 GB", ("deepseek-ai/Janus-1.3B", 2, 74 * GB, 4.6 * GB), 32, 8192),
    # Janus-Pro-7B (15 GB of weights) on a 24 GB card: room for a few rows only.
    ("7B on gpu 24 GB", ("deepseek-ai/Janus-Pro-7B", 2, 8 * GB, 15.4 * GB), 4, 2816),
])
def test_cache_for_host_and_gpu_memory_sizes(what, args, rows, row_length):
    chosen = plan(*args)
    assert (chosen.rows, chosen.row_length) == (rows, row_length), what
    # Within its share of the memory, every row long enough for the longest answer after an image.
    assert chosen.bytes <= 0.7 * chosen.free_bytes
    assert chosen.row_length >= 576 + 64 + 2048 and chosen.row_length % 64 == 0
    assert chosen.images_at_once == rows // 2
    assert chosen.info()["understanding_at_once"] == rows


def test_the_bounds_are_upper_bounds():
    roomy = dict(free=74 * GB, loaded=4.6 * GB)
    few_rows = plan("deepseek-ai/Janus-1.3B", 2, roomy["free"], roomy["loaded"], max_rows=4)
    assert few_rows.rows == 4 and few_rows.row_length == 16384  # the model's whole context per row
    bounded = plan("deepseek-ai/Janus-1.3B", 2, roomy["free"], roomy["loaded"], max_positions=8192)
    assert (bounded.rows, bounded.row_length, bounded.positions) == (3, 2688, 8064)
    # Short answers make short rows, so more of them.
    short = plan("deepseek-ai/Janus-1.3B", 4, 14.5 * GB, 11 * GB, max_new_tokens=256)
    assert short.rows == 28 and short.row_length == 896


def test_a_cache_that_cannot_fit_is_refused_with_the_numbers():
    with pytest.raises(CacheDoesNotFit) as refused:
        plan("deepseek-ai/Janus-1.3B", 4, 1.0 * GB, 8.6 * GB, max_new_tokens=4096)
    message = str(refused.value)
    assert message.startswith("the KV cache needs at least 3.7 GB (2 rows x 4736 positions")
    assert "1.0 GB is free after loading the model (8.6 GB)" in message
    assert "--memory-fraction 0.7 gives the cache 0.7 GB" in message
    assert "lower --max-new-tokens-limit" in message
    with pytest.raises(CacheDoesNotFit, match=r"--max-cache-tokens 4000 allows 0.8 GB; raise it"):
        plan("deepseek-ai/Janus-1.3B", 2, 74 * GB, 4.6 * GB, max_positions=4000)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_host(root: Path, available_kb: int, cgroup: str = "0::/\n") -> Path:
    write(root / "proc/meminfo", f"MemTotal:       25165824 kB\nMemFree:  1000 kB\nMemAvailable:   {available_kb} kB\n")
    write(root / "proc/self/cgroup", cgroup)
    return root


def test_host_memory_is_mem_available_without_a_limit(tmp_path):
    root = fake_host(tmp_path, 20 * 1024 * 1024)
    write(root / "sys/fs/cgroup/memory.max", "max\n")
    assert host_available_bytes(str(root)) == 20 * GIB
    assert cgroup_room(root) is None


def test_a_cgroup_v2_limit_bounds_host_memory(tmp_path):
    root = fake_host(tmp_path, 20 * 1024 * 1024, "0::/kubepods/pod1/janus\n")
    group = root / "sys/fs/cgroup/kubepods/pod1/janus"
    write(group / "memory.max", "max\n")
    write(group / "memory.current", "0\n")
    # The pod is limited to 16 GiB and holds 9 GiB, 1 GiB of it inactive page cache (reclaimable).
    write(group.parent / "memory.max", f"{16 * GIB}\n")
    write(group.parent / "memory.current", f"{9 * GIB}\n")
    write(group.parent / "memory.stat", f"anon {8 * GIB}\ninactive_file {GIB}\n")
    assert host_available_bytes(str(root)) == 8 * GIB


def test_a_cgroup_v1_limit_bounds_host_memory(tmp_path):
    root = fake_host(tmp_path, 6 * 1024 * 1024, "4:memory:/docker/abc\n3:cpu:/docker/abc\n")
    group = root / "sys/fs/cgroup/memory/docker/abc"
    write(group / "memory.limit_in_bytes", f"{12 * GIB}\n")
    write(group / "memory.usage_in_bytes", f"{2 * GIB}\n")
    write(group / "memory.stat", f"cache {GIB}\ntotal_inactive_file {GIB // 2}\n")
    write(root / "sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")  # the root: no limit
    write(root / "sys/fs/cgroup/memory/memory.usage_in_bytes", f"{20 * GIB}\n")
    assert cgroup_room(root) == 12 * GIB - 2 * GIB + GIB // 2
    assert host_available_bytes(str(root)) == 6 * GIB  # MemAvailable is tighter here


def test_gpu_memory_counts_what_paddle_holds_unused(monkeypatch):
    import paddle

    from model.runtime import device

    cuda = paddle.device.cuda
    monkeypatch.setattr(cuda, "memory_allocated", lambda index: 5 * GB)
    monkeypatch.setattr(cuda, "memory_reserved", lambda index: 6 * GB)
    monkeypatch.setattr(device, "cuda_free_bytes", lambda index: 10 * GB)
    assert device.gpu_memory("gpu:1") == (11 * GB, 5 * GB)
    # Without the CUDA runtime library: the card's total less what Paddle holds.
    monkeypatch.setattr(device, "cuda_free_bytes", lambda index: None)
    monkeypatch.setattr(cuda, "get_device_properties", lambda index: type("P", (), {"total_memory": 24 * GB}))
    assert device.gpu_memory("gpu:0") == (18 * GB, 5 * GB)
    assert device.cuda_free_bytes(0) is None  # no CUDA runtime library on this machine


def test_one_row_serves_understanding_alone():
    one = plan("deepseek-ai/Janus-1.3B", 4, 14.5 * GB, 11 * GB, max_rows=1)
    assert (one.rows, one.row_length, one.images_at_once) == (1, 16384, 0)
    with pytest.raises(CacheDoesNotFit, match=r"\(1 row x 2688 positions: an understanding request with an image"):
        plan("deepseek-ai/Janus-1.3B", 4, 1.0 * GB, 11 * GB, max_rows=1)
