"""Atomic writes (ldm.atomic) and device and dtype names (ldm.devices)."""

import pytest
import torch

from ldm.atomic import atomic_dir, atomic_path, write_text_atomic
from ldm.devices import parse_dtype, pick_device, pick_dtype


def test_a_file_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]  # the temporary name is gone
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".a.txt.tmp-")
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "state"
    with atomic_dir(target) as tmp:
        (tmp / "nested").mkdir()
        (tmp / "nested" / "w.bin").write_bytes(b"1")
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(target) as tmp:
            (tmp / "x").write_text("partial")
            raise OSError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["state"]
    assert (target / "nested" / "w.bin").read_bytes() == b"1"
    with atomic_dir(target) as tmp:
        (tmp / "y").write_text("new")
    assert [p.name for p in target.iterdir()] == ["y"] and [p.name for p in tmp_path.iterdir()] == ["state"]


def test_devices_and_dtypes_by_name():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("auto", torch.device("cuda")) == torch.float16
    assert parse_dtype("bf16") == parse_dtype("bfloat16") == parse_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; choose one of fp32, fp16, bf16"):
        parse_dtype("fp8")
    with pytest.raises(ValueError, match="unknown device 'gpu'; use cuda, cuda:N, cpu, mps or auto"):
        pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="asked for CUDA but no CUDA device is available; use --device cpu"):
            pick_device("cuda:0")
