import os
import platform

import torch


def pytest_report_header(config):
    lines = [f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"]
    if torch.cuda.is_available():
        lines.append(f"GPU {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
    return lines
