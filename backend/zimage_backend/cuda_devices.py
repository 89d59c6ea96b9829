"""Whether a tritonserver started with a given environment will see a CUDA device, the question
that Triton's KIND_AUTO answers for itself (cudaGetDeviceCount), asked without torch and
without a CUDA context in the launcher.

``python -m zimage_backend.cuda_devices`` prints the count this environment shows.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from typing import Mapping


def cuda_device_count() -> int:
    """CUDA devices that the driver shows this process; 0 without a driver or a device."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def server_sees_gpus(env: Mapping[str, str]) -> bool:
    """Asked in a child process started with `env`, so that the server's own
    CUDA_VISIBLE_DEVICES counts."""
    result = subprocess.run([sys.executable, "-m", __name__], env=dict(env), capture_output=True,
                            text=True, timeout=60, check=False)
    # A check that cannot run says "GPUs": config.pbtxt then stays as it is, and no GPU ever
    # gets a second instance's memory.
    return result.returncode != 0 or int(result.stdout.strip() or 0) > 0


if __name__ == "__main__":
    sys.stdout.write(f"{cuda_device_count()}\n")
