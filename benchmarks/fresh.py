"""Jobs measured in a fresh interpreter, so that earlier work (allocator pools, cached kernels) does not count.

`run_job("name", **arguments)` runs `benchmarks.jobs.name(probe, **arguments)` through `python -m benchmarks.fresh`
and returns the probe's figures: `seconds` (from the probe's start, which a job may move past its set-up), `mib`
(the peak RSS increase over the interpreter with the package imported), `peak_rss_mib` (the process's whole
peak RSS) and whatever the job put in `marks`.
"""

import json
import os
import subprocess
import sys
import threading
import time

import psutil

from benchmarks.common import ROOT


class Probe:
    """Peak resident memory sampled by a thread (ru_maxrss survives fork + exec from a large parent, so it cannot
    be used), a timer, and the job's own figures."""

    def __init__(self, interval: float = 0.005):
        self.process = psutil.Process()
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self.marks: dict[str, float] = {}
        self.interval = interval
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.start = time.perf_counter()

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def rss_mib(self) -> float:
        """The current RSS increase over the start, in MiB."""
        return (self.process.memory_info().rss - self.baseline) / 2**20

    def restart(self):
        """Time from now on (past a job's set-up)."""
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def reset_peak(self):
        """Measure the peak from now on (past a warm-up call)."""
        self.peak = self.process.memory_info().rss

    def finish(self) -> dict[str, float]:
        seconds = self.elapsed()
        self.done.set()
        self.thread.join()
        return {
            "seconds": seconds,
            "mib": (self.peak - self.baseline) / 2**20,
            "peak_rss_mib": self.peak / 2**20,
            **self.marks,
        }


def run_job(name: str, env: dict | None = None, **arguments) -> dict[str, float]:
    """Run the job `name` of `benchmarks.jobs` with `arguments` (JSON values) in a fresh interpreter."""
    output = subprocess.run(
        [sys.executable, "-m", "benchmarks.fresh", name, json.dumps(arguments)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    if output.returncode:
        raise RuntimeError(f"benchmark job {name} failed:\n{output.stderr}")
    return json.loads(output.stdout.splitlines()[-1])


def main():
    name, arguments = sys.argv[1], json.loads(sys.argv[2])
    # Imported before the baseline RSS is read, so that the figures are above the package's own import.
    import regionmed_clip.data.collator  # noqa: F401
    import regionmed_clip.evaluation  # noqa: F401
    from benchmarks import jobs

    probe = Probe()
    getattr(jobs, name)(probe, **arguments)
    print(json.dumps(probe.finish()))


if __name__ == "__main__":
    main()
