"""benchmarks/gpu_check.sh fits one device call: its steps' timeouts add up to less than the 600 s a call may run."""

import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
DEVICE_CALL_S = 600  # the device tool's per-call limit
MARGIN_S = 20  # env.txt (nvidia-smi, imports) and the links, outside any step's timeout


def test_step_timeouts_fit_one_device_call():
    text = SCRIPT.read_text()
    steps = [int(s) for s in re.findall(r"^timeout (\d+) ", text, flags=re.M)]
    assert len(steps) == 4, steps  # gather probe, gpu tests, benchmark, summary
    assert sum(steps) + MARGIN_S <= DEVICE_CALL_S, f"steps {steps} leave no room in a {DEVICE_CALL_S} s call"


def test_benchmark_budget_leaves_time_for_its_last_group():
    text = SCRIPT.read_text()
    timeout, budget = map(
        int, re.search(r"^timeout (\d+) .*bench_kernels_gpu\.py --budget-s (\d+)", text, re.M).groups()
    )
    assert timeout - budget >= 60  # a group started just before the budget ends still finishes and writes its JSON
