"""Every benchmark JSON says where it ran: CPU model and capability, cores, torch, GPU, and the same-run
matrix-product rates (fp32 and bf16) that its ratios and utilisations are read against."""
import os

import torch

from ultra_fast.engine.hardware import hardware_info
from ultra_fast.profiling.bench import same_run_matmul_rates

SMOKE = os.environ.get("ULTRA_FAST_BENCH_SMOKE", "") not in ("", "0")


def pytest_benchmark_update_machine_info(config, machine_info):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    machine_info["ultra_fast"] = {
        "hardware": hardware_info(torch.device(devices[-1])),
        "matmul_rates": {d: same_run_matmul_rates(torch.device(d), n=512 if SMOKE else 4096) for d in devices},
    }
