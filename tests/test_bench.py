import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from helpers import CONFIGS, ROOT, TINY
from ldm import LDMPipeline
from ldm import bench
from ldm.bench import workloads as bench_workloads
from ldm.bench import BenchOptions, MismatchError, Row, count_flops, format_table, run_bench
from ldm.config import resolve_config

ROW_KEYS = {f.name for f in dataclasses.fields(Row)}
MODEL_ROWS = {"unet", "train", "vae", "generate_2"}
DATA_ROWS = {"data_shapes", "data_shards", "data_latents"}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_options(**kw) -> BenchOptions:
    defaults = dict(config=TINY, device="cpu", resolution=32, train_shapes=[(32, 2)], generate_steps=(2,),
                    repeats=2, warmup=1, data_workers=0)
    return BenchOptions(**{**defaults, **kw})


def test_every_workload_gives_rows_with_real_numbers():
    result = run_bench(tiny_options(peak_tflops=0.5))
    rows = {r.workload: r for r in result.rows}
    assert set(rows) == MODEL_ROWS | DATA_ROWS and len(result.rows) == len(rows)
    items = {"unet": 1, "train": 2, "vae": 1, "generate_2": 1, **{w: 2 for w in DATA_ROWS}}
    for name, r in rows.items():
        assert set(dataclasses.asdict(r)) == ROW_KEYS
        assert r.impl.startswith("ldm") and r.median_ms > 0
        assert r.rate == pytest.approx(items[name] / (r.median_ms / 1e3))
        assert r.peak_mem_gib is None  # CPU: n/a
        if name in DATA_ROWS:
            assert r.flops is None and r.tflops_per_s is None and r.mfu is None
        else:
            assert r.flops > 0
            assert r.tflops_per_s == pytest.approx(r.flops / (r.median_ms / 1e3) / 1e12)
            assert r.mfu == pytest.approx(r.tflops_per_s / 0.5)
    assert rows["unet"].shape == "2x4x8x8" and rows["vae"].shape == "1x4x8x8"
    # a training step is forward + backward: about 3x the forward FLOPs of the same batch
    assert 2.5 < rows["train"].flops / rows["unet"].flops < 3.5
    # generate: 2 CFG steps of the U-Net plus text encoding and a decode
    assert rows["generate_2"].flops > 2 * rows["unet"].flops + rows["vae"].flops
    assert result.peak_tflops == 0.5 and result.dtype == "float32" and result.device == "cpu"
    json.loads(json.dumps(result.to_dict()))
    table = format_table(result)
    assert all(name in table for name in rows) and "ldm speedup" in table


def test_flop_counter_matches_analytic_counts_of_linear_conv_and_attention():
    m, k, n = 5, 7, 11
    assert count_flops(lambda: nn.Linear(k, n)(torch.randn(m, k))) == 2 * m * n * k
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    assert count_flops(lambda: conv(torch.randn(2, 3, 6, 6))) == 2 * (2 * 8 * 6 * 6) * (3 * 3 * 3)
    q, kv = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 10, 8)
    # QK^T and AV: 2 matmuls of 2 * b * h * Lq * Lk * d each (the CPU kernel FlopCounterMode lacks)
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, kv, kv)) == 4 * 2 * 4 * 16 * 10 * 8


def analytic_unet_flops(unet: nn.Module, x, t, context, monkeypatch) -> int:
    """Matmul FLOPs of a U-Net forward from the shapes its layers see: convs, linears, attention."""
    total = 0

    def layer(module, inputs, out):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += 2 * out.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total += 2 * out.numel() * module.in_features

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def attention(q, k, v, *args, **kwargs):
        nonlocal total
        b, h, lq, d = q.shape
        total += 4 * b * h * lq * k.shape[-2] * d
        return sdpa(q, k, v, *args, **kwargs)

    hooks = [m.register_forward_hook(layer) for m in unet.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", attention)
    try:
        with torch.no_grad():
            unet(x, t, context)
    finally:
        for hook in hooks:
            hook.remove()
        monkeypatch.undo()
    return total


def test_unet_flops_match_the_analytic_count_and_scale_with_batch(monkeypatch):
    unet = LDMPipeline.from_config(TINY).unet.eval()

    def inputs(b):
        return torch.randn(b, 4, 8, 8), torch.full((b,), 500.0), torch.randn(b, 77, 128)

    x, t, c = inputs(2)
    with torch.no_grad():
        counted = count_flops(lambda: unet(x, t, c))
    assert counted == analytic_unet_flops(unet, x, t, c, monkeypatch) > 0
    with torch.no_grad():
        assert count_flops(lambda: unet(*inputs(4))) == 2 * counted
        assert count_flops(lambda: unet(*inputs(1))) * 2 == counted


def test_vs_diffusers_agrees_on_the_same_weights_and_gives_ratios():
    result = run_bench(tiny_options(workloads=["unet", "vae", "generate"], vs_diffusers=True))
    ours = {r.workload: r for r in result.rows if r.impl == "ldm"}
    theirs = {r.workload: r for r in result.rows if r.impl == "diffusers"}
    assert set(ours) == set(theirs) == {"unet", "vae", "generate_2"}
    for name in ("unet", "vae"):
        assert 0 <= theirs[name].max_rel_err < 1e-4  # fp32 on the CPU: the same computation
    assert theirs["generate_2"].max_rel_err is None
    for name, r in theirs.items():
        assert r.flops == ours[name].flops > 0
        assert r.ldm_speedup == pytest.approx(r.median_ms / ours[name].median_ms) and r.ldm_speedup > 0
    assert "diffusers" in result.versions
    assert "diffusers" in format_table(result)


def test_a_disagreement_with_diffusers_is_a_failed_row_and_the_other_rows_still_run(monkeypatch):
    # below zero: even no error is too much (the VAE decoder equals diffusers' bit for bit in fp32 on a CPU)
    monkeypatch.setitem(bench.AGREEMENT_TOLERANCE, torch.float32, -1.0)
    result = run_bench(tiny_options(workloads=["unet", "vae"], vs_diffusers=True))
    assert [(r.workload, r.impl, r.error is None) for r in result.rows] == [
        ("unet", "ldm", True), ("unet", "diffusers", False), ("vae", "ldm", True), ("vae", "diffusers", False)]
    failed = result.rows[3]
    assert failed.error.startswith(f"{MismatchError.__name__}: our VAE decoder and diffusers' on the same weights")
    assert math.isnan(failed.median_ms) and result.failures == [result.rows[1], failed]
    table = format_table(result)
    assert "failed: vae diffusers 1x4x8x8: MismatchError: our VAE decoder" in table
    assert result.rows[2].median_ms > 0  # ours still measured


def test_a_workload_that_raises_is_a_failed_row_and_the_next_workload_runs(monkeypatch):
    def broken(s, theirs, emit):
        raise RuntimeError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setitem(bench_workloads.WORKLOAD_RUNNERS, "unet", broken)
    result = run_bench(tiny_options(workloads=["unet", "vae"]))
    assert [(r.workload, r.error) for r in result.rows] == [
        ("unet", "RuntimeError: CUDA out of memory. Tried to allocate 80.00 GiB"), ("vae", None)]


def test_vs_diffusers_without_diffusers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    with pytest.raises(ImportError, match=r'pip install -e "\.\[bench\]"'):
        run_bench(tiny_options(workloads=["unet"], vs_diffusers=True))


def test_speed_switches_are_applied_and_still_agree_with_diffusers():
    pytest.importorskip("ldm.speed")
    switches = {"channels_last": True, "fuse_qkv": True, "fused_norm_act": True}
    result = run_bench(tiny_options(workloads=["unet", "train", "vae", "generate"], speed=switches, vs_diffusers=True))
    ours = "ldm+channels_last+fuse_qkv+fused_norm_act"
    assert [(r.workload, r.impl) for r in result.rows] == [
        (w, impl) for w in ("unet", "train", "vae", "generate_2") for impl in (ours, "diffusers")
    ]
    assert all(r.max_rel_err < 1e-4 for r in result.rows if r.workload in ("unet", "vae") and r.impl == "diffusers")
    assert all(r.median_ms > 0 and r.flops > 0 for r in result.rows)
    assert result.speed == switches


def test_config_names_and_bad_options_are_clear_errors():
    assert resolve_config("sd15") == CONFIGS / "sd15.yaml"
    with pytest.raises(ValueError, match=r"config 'nope' not found: .*sd15.*sd_tiny"):
        run_bench(tiny_options(config="nope"))
    with pytest.raises(ValueError, match=r"unknown workloads \['unets'\]; choose from unet, train"):
        run_bench(tiny_options(workloads=["unets"]))
    with pytest.raises(ValueError, match=r"resolution must be a multiple of the VAE factor 4 \(got 30\); try 28 or 32"):
        run_bench(tiny_options(resolution=30, workloads=["vae"]))


def run_tool(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "tools/bench.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


def test_cli_writes_a_table_and_valid_json(tmp_path):
    out = tmp_path / "bench.json"
    r = run_tool("--config", "tests/configs/tiny64.yaml", "--device", "cpu", "--repeats", "2", "--warmup", "1",
                 "--resolution", "32", "--workloads", "unet,vae", "--json", out)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert [row["workload"] for row in data["rows"]] == ["unet", "vae"]
    assert all(row["median_ms"] > 0 and set(row) == ROW_KEYS for row in data["rows"])
    assert data["dtype"] == "float32" and data["config"].endswith("tiny64.yaml")
    assert "workload" in r.stdout and "2x4x8x8" in r.stdout and f"wrote {out}" in r.stdout
    assert "unet:" in r.stderr  # progress goes to stderr


def test_profile_lists_the_top_ops_of_ours_and_of_diffusers_with_their_shares():
    result = run_bench(tiny_options(workloads=["unet"], vs_diffusers=True, profile=True))
    profile = result.profile
    assert profile["steps"] == 5 and profile["shape"] == "2x4x8x8" and set(profile) >= {"ours", "diffusers"}
    for impl in ("ours", "diffusers"):
        kernels = profile[impl]
        assert 0 < len(kernels) <= 15 and all(k["ms_per_step"] > 0 and k["calls_per_step"] > 0 for k in kernels)
        assert [k["ms_per_step"] for k in kernels] == sorted((k["ms_per_step"] for k in kernels), reverse=True)
        assert 0 < sum(k["share"] for k in kernels) <= 1 + 1e-9
        assert any("conv" in k["name"] for k in kernels)  # the U-Net's convolutions are among the top ops


def test_cli_prints_every_row_when_diffusers_cannot_run_one_and_keeps_the_json(tmp_path):
    # sd_tiny's text encoder has 32 positions; diffusers' pipeline tokenizes to 77, so its generate fails
    # (its text layout map, which diffusers has no form of, is turned off so that the U-Net row runs)
    out = tmp_path / "bench.json"
    r = run_tool("--config", "sd_tiny", "--set", "model.unet.text_layout_grid=0", "--device", "cpu", "--repeats", "1",
                 "--warmup", "0", "--resolution", "32",
                 "--workloads", "unet,generate", "--steps", "2", "--vs-diffusers", "--json", out)
    assert r.returncode == 1 and "error: 1 of 4 rows failed" in r.stderr and "Traceback" not in r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(row["workload"], row["impl"], row["error"] is None) for row in rows] == [
        ("unet", "ldm", True), ("unet", "diffusers", True), ("generate_2", "ldm", True),
        ("generate_2", "diffusers", False)]
    assert "failed: generate_2 diffusers 32px x1:" in r.stdout and "unet" in r.stdout


def test_cli_reports_a_bad_config_without_a_traceback():
    r = run_tool("--config", "configs/missing.yaml", "--device", "cpu")
    assert r.returncode == 2
    assert "error: config 'configs/missing.yaml' not found" in r.stderr and "Traceback" not in r.stderr
    r = run_tool("--config", "sd_tiny", "--device", "cpu", "--train-resolution", "64,128", "--train-batch", "1,2,3")
    assert r.returncode == 2 and "2 training resolutions and 3 batch sizes" in r.stderr
