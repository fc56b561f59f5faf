"""The reduced soak (bench/soak.py --cells quick): fresh processes under a hang watchdog.

It holds oneDNN, XLA and YNNPACK to AVX2 and asks for oneDNN (``--onednn on``), the setting in
which the U-Net hung (oneDNN's nested gemm) and bfloat16 killed the process (SIGILL) before
oneDNN was gated: every run must now end normally, on the default XLA path. The soak's own
detectors are checked first, on a child that stalls without CPU and one that aborts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from _train_helpers import REPO

SOAK = REPO / "bench" / "soak.py"


def _soak(tmp_path, *flags, timeout, env=None):
    out_json = tmp_path / "soak.json"
    res = subprocess.run(
        [sys.executable, str(SOAK), f"--logs={tmp_path / 'logs'}", f"--json={out_json}", *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    results = json.loads(out_json.read_text())["results"] if out_json.exists() else []
    return res, results


def test_soak_detects_a_hang_and_a_crash(tmp_path):
    cells = "digits:float32:selftest_hang:1:1,digits:float32:selftest_crash:1:1"
    res, results = _soak(tmp_path, f"--cells={cells}", "--idle=3", timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    assert [r["status"] for r in results] == ["hang", "crash"], res.stdout
    assert "SIGABRT" in results[1]["detail"]
    hang_log = open(results[0]["log"]).read()
    assert "in run_cell" in hang_log  # the child's Python stack, dumped on SIGUSR1
    assert "soak: 2 runs: 0 ok, 1 hangs, 1 crashes" in res.stdout


def test_qemu_runs_each_child_under_the_emulator_and_holds_the_gates_to_avx2(tmp_path):
    # A stand-in qemu-x86_64 first on PATH: it records its arguments and runs the program after
    # "-cpu MODEL" natively, so the child's crash must come back through it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "qemu-x86_64"
    fake.write_text('#!/bin/sh\necho "$@" > "$FAKE_QEMU_ARGS"\nshift 2\nexec "$@"\n')
    fake.chmod(0o755)
    args_file = tmp_path / "qemu_args.txt"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env["FAKE_QEMU_ARGS"] = str(args_file)
    cell = "digits:float32:selftest_crash:1:1"
    res, results = _soak(tmp_path, "--qemu=Zen3Model", f"--cells={cell}", timeout=120, env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert [r["status"] for r in results] == ["crash"] and "SIGABRT" in results[0]["detail"]
    recorded = args_file.read_text().split()
    assert recorded[:2] == ["-cpu", "Zen3Model"] and recorded[-2:] == ["--worker", cell]
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["qemu_cpu"] == "Zen3Model" and report["isa_limit"] == "AVX2"
    assert "on qemu-x86_64 -cpu Zen3Model on " in res.stdout

    # Without qemu-x86_64 on PATH: one line naming the flag and the package, no traceback.
    env["PATH"] = str(tmp_path / "empty")
    res, _ = _soak(tmp_path, "--qemu=Zen3Model", f"--cells={cell}", timeout=60, env=env)
    assert res.returncode == 2
    assert "--qemu Zen3Model: qemu-x86_64 is not on PATH (Debian: qemu-user)" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow  # three fresh processes, each compiling a U-Net: about a minute on 2 cores
def test_quick_soak_held_to_avx2_has_no_hang_and_no_crash(tmp_path):
    # --idle 60: a child on a loaded 2-core machine (pytest -n 2) may wait its turn, but a
    # deadlocked one uses no CPU at all.
    res, results = _soak(
        tmp_path, "--cells=quick", "--isa=AVX2", "--onednn=on", "--idle=60", timeout=1500
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert len(results) == 3 and all(r["status"] == "ok" for r in results)
    # The switch was refused for the ISA, with the reason, and the runs took XLA's kernels.
    assert all("ONEDNN_MAX_CPU_ISA=AVX2 is below" in r["detail"] for r in results), results
    # YNNPACK was held too, to the AVX2 features this CPU has (bench/ynn_isa.py), where this
    # jaxlib lets it be; elsewhere the soak says why not, once.
    if "YNNPACK not held" in res.stdout:
        assert "ISA held to: AVX2 (oneDNN, XLA);" in res.stdout
    else:
        assert "ISA held to: AVX2 (oneDNN, XLA, YNNPACK);" in res.stdout
        assert all("YNNPACK held to AVX2 (arch flags 0x" in r["detail"] for r in results)


def test_child_env_holds_every_library_only_where_asked(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import soak

    cell = soak.Cell.parse("digits:float32:jit_apply:2:2")
    monkeypatch.setenv("DIFFJAX_BENCH_YNN_ISA", "AVX2")  # never inherited: the flags decide
    env = soak.child_env(cell, None, "default")
    assert "DIFFJAX_BENCH_YNN_ISA" not in env and "ONEDNN_MAX_CPU_ISA" not in env
    assert "--xla_force_host_platform_device_count=2" in env["XLA_FLAGS"]
    env = soak.child_env(cell, "AVX2", "default")
    assert env["DIFFJAX_BENCH_YNN_ISA"] == env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert "--xla_cpu_max_isa=AVX2" in env["XLA_FLAGS"].split()
    # Under qemu (hold_ynn=False) the emulated CPUID already holds YNNPACK.
    assert "DIFFJAX_BENCH_YNN_ISA" not in soak.child_env(cell, "AVX2", "default", False)
    # A level YNNPACK has no hold for still holds oneDNN and XLA.
    env = soak.child_env(cell, "AVX512_CORE", "default")
    assert "DIFFJAX_BENCH_YNN_ISA" not in env and env["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE"
