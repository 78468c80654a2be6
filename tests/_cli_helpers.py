"""Running the `acamkd` CLI in a subprocess for end-to-end tests, and killing a run mid-way."""
import json
import os
import signal
import subprocess
import sys
import time

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # same float order in every process


def acamkd(*args, check=True):
    """``python -m acamkd.cli ARGS`` with output captured; on failure (``check``) the stderr tail."""
    proc = subprocess.run([sys.executable, "-m", "acamkd.cli", *args], env=ENV, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"acamkd {' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
    return proc


def sigkill_after_step(args, metrics_file, step=3, timeout=300.0) -> None:
    """Start ``acamkd ARGS`` and SIGKILL it as soon as ``metrics_file`` logs ``step``."""
    signal_after_step(args, metrics_file, signal.SIGKILL, step=step, timeout=timeout)


def signal_after_step(args, metrics_file, signum, step=2, timeout=300.0, group=False):
    """Start ``acamkd ARGS``, send ``signum`` once ``metrics_file`` logs ``step`` (to the whole process
    group with ``group``, as a terminal's Ctrl-C does), wait; the finished ``Popen`` with its stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "acamkd.cli", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=group)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics_file.exists() and any(json.loads(line)["step"] >= step
                                         for line in metrics_file.read_text().splitlines()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the signal could be sent"
    if group:
        os.killpg(proc.pid, signum)
    else:
        os.kill(proc.pid, signum)
    proc.stderr_text = proc.communicate(timeout=timeout)[1]
    return proc
