"""Calibration threads (from the cores actually free) and progress (determinate, with an ETA that follows the
measured pass times; line by line when stderr is not a terminal). Times come from a fake clock: no timed asserts."""
from __future__ import annotations

import pytest

from trt_gemma.quant.calibration import (PASS_COST, CalibrationProgress, available_cores, choose_threads, seconds_left)
from trt_gemma.errors import ConfigError


@pytest.mark.parametrize("cores,load,want", [(2, 1.7, 1), (2, 0.1, 2), (2, 7.5, 1), (16, 0.2, 16), (8, 3.0, 5),
                                             (8, 2.6, 5), (1, 0.0, 1)])
def test_threads_come_from_the_free_cores(cores, load, want):
    n, why = choose_threads(cores=cores, load=load)
    assert n == want and f"{cores} cores" in why and "--threads" in why


def test_requested_threads_win_and_are_checked():
    assert choose_threads(3, cores=2, load=9.0)[0] == 3
    with pytest.raises(ConfigError, match="--threads 0"):
        choose_threads(0)


def test_cgroup_quota_caps_the_affinity(tmp_path):
    (tmp_path / "sys/fs/cgroup").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/cpu.max").write_text("150000 100000\n")  # 1.5 CPUs of a container
    assert available_cores(tmp_path) == 1
    (tmp_path / "sys/fs/cgroup/cpu.max").write_text("max 100000\n")  # no quota: the affinity mask alone
    import os

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert available_cores(tmp_path) == affinity


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _run(quant, n, seconds_per_pass, lines, interactive=False, extra_passes=0):
    clock = Clock()
    with CalibrationProgress(quant, n, lines.append, interactive=interactive, clock=clock) as bar:
        etas = []
        for p in range(len(PASS_COST[quant]) + extra_passes):
            for i in range(n):
                clock.t += seconds_per_pass[min(p, len(seconds_per_pass) - 1)] * (2 if p == i == 0 else 1)
                bar.step()
                etas.append(bar.eta())
    return bar, etas


def test_eta_follows_the_passes_and_ends_at_zero():
    lines: list[str] = []
    bar, etas = _run("int4_awq", 4, [1.0, 9.0], lines)  # pass 2 costs 9x pass 1, as PASS_COST says
    assert bar.total == 8 and bar.done == 8 and etas[-1] == 0
    assert etas[1] == pytest.approx(2 * 1.0 + 4 * 9.0), "after 2 forwards: 2 of pass 1 and 4 of pass 2 left"
    assert [t for _, t in bar.times][:2] == [2.0, 1.0]
    estimate = next(line for line in lines if "estimated" in line)
    assert "8 forwards in 2 passes, estimated 41 s" in estimate  # 3 s spent + 38 s left; the real run is 41 s


def test_eta_corrects_itself_when_a_pass_is_slower_than_the_table():
    bar, etas = _run("int4_awq", 4, [1.0, 20.0], [])
    assert etas[5] == pytest.approx(2 * 20.0), "in pass 2 the measured pass-2 mean is used, not the table's"


def test_lines_when_not_a_terminal_and_growth_past_the_table():
    lines: list[str] = []
    bar, _ = _run("fp8", 3, [10.0], lines, extra_passes=1)  # ModelOpt ran a pass more than PASS_COST knows
    assert bar.total == 6 and bar.done == 6, "the total grows instead of overrunning"
    progress = [line for line in lines if line.startswith("calibrating fp8: ")]
    assert progress[0].startswith("calibrating fp8: 1/3 forwards (pass 1/1), 20 s elapsed")
    assert progress[-1] == "calibrating fp8: 6/6 forwards done in 70 s"


def test_seconds_left_skips_the_setup_forward():
    assert seconds_left([(0, 5.0)], [1.0, 9.0], 2) == pytest.approx(5.0 + 2 * 45.0)
    assert seconds_left([(0, 5.0), (0, 1.0)], [1.0, 9.0], 2) == pytest.approx(2 * 9.0)


def test_terminal_bar_is_determinate():
    bar, _ = _run("int4_awq", 2, [1.0, 9.0], [], interactive=True)
    task = bar._bar.tasks[0]
    assert task.total == 4 and task.completed == 4 and "pass 2/2" in task.description


def test_quantize_threads_are_checked_before_work(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("torch")
    from trt_gemma.cli import main

    with pytest.raises(SystemExit) as e:
        main(["quantize", str(tiny_model_dir), str(tmp_path / "q"), "--quant", "fp8", "--threads", "0"])
    assert e.value.code == ConfigError.exit_code and "--threads 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
