"""benchmarks/gpu_check.py, the one prepared GPU run: in --tiny mode every check runs on the CPU and says what only a
GPU can show; a failing or late check is recorded without stopping the others."""

import json
import time

from helpers import load_benchmark


def test_tiny_mode_runs_every_check_on_the_cpu(tmp_path):
    gpu_check = load_benchmark("gpu_check.py")
    report = gpu_check.main([str(tmp_path), "--tiny"])
    checks = report["checks"]
    assert list(checks) == [check.__name__ for check in gpu_check.CHECKS]
    assert {name: entry["status"] for name, entry in checks.items()} == dict.fromkeys(checks, "ok"), report
    for cuda_only in ("one_pass_lora", "mot_end_to_end", "fit_8b"):  # what the CPU cannot show is named
        assert checks[cuda_only]["skipped"], cuda_only
    assert checks["tf32_install"]["details"]["installed_relative_error"] < 1e-7
    assert checks["mot_end_to_end"]["details"]["persistent"]["export_relative_error"] < 1e-6
    assert checks["fit_8b"]["details"]["complete"]
    assert any("GPU run" in line for line in report["owed"])
    assert json.loads((tmp_path / "gpu_check.json").read_text())["checks"].keys() == checks.keys()
    assert (tmp_path / "gpu_fit_tiny_cpu.json").exists()


def test_a_failing_check_is_recorded_and_the_next_one_runs(tmp_path, capsys):
    gpu_check = load_benchmark("gpu_check.py")

    def broken(ctx):
        raise ValueError("this card is on fire")

    ctx = gpu_check.Context(out=tmp_path, tiny=True, deadline=time.monotonic() + 600)
    report = gpu_check.run_checks(ctx, [broken, gpu_check.tf32_install])
    assert report["checks"]["broken"]["status"] == "failed"
    assert "ValueError: this card is on fire" in report["checks"]["broken"]["error"]
    assert "this card is on fire" in capsys.readouterr().err  # the traceback is shown as well
    assert report["checks"]["tf32_install"]["status"] == "ok"
    assert "broken: failed" in report["owed"]
    late = gpu_check.Context(out=tmp_path, tiny=True, deadline=time.monotonic() - 1)
    assert gpu_check.run_checks(late, [gpu_check.tf32_install])["checks"]["tf32_install"]["status"] == "skipped"
