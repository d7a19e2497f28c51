"""benchmarks/throughput.py runs end to end and writes a complete, sensible JSON report."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vit_cli.models.vit import VisionTransformer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"

# A two-block ViT at 32 px, a few steps of each kind: seconds, not minutes.
TINY_RUN = [
    "model=vit",
    "model.img_size=32",
    "model.patch_size=8",
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "data.batch_size=2",
    "--warmup=1",
    "--windows=2",
    "--steps-per-window=1",
    "--matmul-size=128",
    "--num-classes=10",
    "--timm-model=vit_tiny_patch16_224",
    "--naive-attention",
    "--device=cpu",
]


def _positive(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def run_throughput(tmp_path: Path, *args: str) -> tuple[str, dict]:
    """Run the script with `args`; returns what it printed and the JSON it wrote."""
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args, f"--json={out}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_throughput_script_writes_finite_positive_figures_for_every_model(tmp_path):
    stdout, report = run_throughput(tmp_path, *TINY_RUN)
    assert "train img/s" in stdout

    assert report["meta"]["batch_size"] == 2
    assert report["meta"]["img_size"] == 32
    assert all(_positive(peak) for peak in report["meta"]["matmul"]["tflop_per_s"].values())

    has_timm = importlib.util.find_spec("timm") is not None
    expected = {"ours", "naive"} | ({"timm"} if has_timm else set())
    assert set(report["models"]) == expected
    for key, model in report["models"].items():
        assert _positive(model["forward_gflop_per_img"]), key
        for phase in ("train", "infer"):
            figures = model[phase]
            for name in ("img_per_s", "tflop_per_s", "mfu"):
                assert _positive(figures[name]), (key, phase, name, figures[name])
            assert len(figures["img_per_s_windows"]) == 2
            assert figures["peak_mem_mib"] is None or figures["peak_mem_mib"] >= 0
        assert math.isfinite(model["train"]["last_loss"])
        if has_timm and key != "timm":
            for phase in ("train", "infer"):
                assert all(_positive(r) for r in model["vs_timm"][phase].values())

    # Same weights, same maths: the naive-attention copy counts the same FLOPs as ours.
    ours, naive = report["models"]["ours"], report["models"]["naive"]
    assert naive["forward_gflop_per_img"] == pytest.approx(ours["forward_gflop_per_img"])
    assert naive["params"] == ours["params"]


def _load_script():
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_naive_attention_computes_the_same_outputs_as_fused_attention():
    throughput = _load_script()
    torch.manual_seed(0)
    ours = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4).eval()
    naive = throughput.with_naive_attention(ours).eval()
    assert all(type(block.attn) is throughput.NaiveAttention for block in naive.blocks)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(naive(x), ours(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_data_parallel_mode_compares_two_processes_with_one_at_the_same_global_batch(tmp_path):
    args = [*TINY_RUN[:6], "data.batch_size=4", "--warmup=1", "--windows=2", "--steps-per-window=1",
            "--num-classes=10", "--device=cpu", "--nproc=2", "--threads=1", "--rounds=1"]  # fmt: skip
    stdout, report = run_throughput(tmp_path, *args)
    assert "2 processes / one process" in stdout
    one, ddp = report["setups"]["one"], report["setups"]["ddp"]
    assert (one["processes"], one["threads_per_process"], one["batch_per_process"]) == (1, 2, 4)
    assert (ddp["processes"], ddp["threads_per_process"], ddp["batch_per_process"]) == (2, 1, 2)
    assert all(_positive(x) for x in (one["img_per_s"], ddp["img_per_s"]))
    assert report["ratio_of_medians"] == pytest.approx(ddp["img_per_s"] / one["img_per_s"])
    assert report["global_batch"] == 4 and report["ideal_ratio"] == 1.0
