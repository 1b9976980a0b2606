"""System metrics of a training run: MLflow's own monitors (CPU and memory, disk, network through psutil; NVIDIA GPU
utilisation and memory through NVML when pynvml finds a GPU) sampled in a thread and journalled like every other
metric, as MLflow's SystemMetricsMonitor names them (`system/cpu_utilization_percentage`, ...): MLflow's run page
shows them under "System metrics", and an offline run or a store that was down gets them with `bench sync`.

MLflow's own SystemMetricsMonitor is not started as is: it writes to the store directly (nothing journalled, nothing
to replay) and polls the store for the run's status on every sample. Its sampling settings are honoured:
MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL (seconds, default 10) and MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING
(default 1).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Optional

log = logging.getLogger(__name__)

PREFIX = "system/"
DEFAULT_INTERVAL_S = 10.0


def _monitors() -> list[Any]:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())  # raises without pynvml or without an NVIDIA GPU
    except Exception as exc:
        log.debug("no GPU system metrics: %s", exc)
    return monitors


class SystemMetrics:
    """Samples every `interval` s; every `samples` samples, logs their mean at the next step (0, 1, 2, ...). The
    first sample is taken at once and the last at `stop`, so a run of any length has at least one point."""

    def __init__(self, log_metrics: Callable[[Mapping[str, Optional[float]], int], None], first_step: int = 0,
                 interval: Optional[float] = None, samples: Optional[int] = None):
        from mlflow.environment_variables import (
            MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING,
            MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL,
        )

        self.log_metrics, self.step = log_metrics, first_step
        self.interval = interval or MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() or DEFAULT_INTERVAL_S
        self.samples = samples or MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING.get() or 1
        self.monitors = _monitors()
        self._stop = threading.Event()
        self._collected = 0
        self._thread = threading.Thread(target=self._loop, name="system-metrics", daemon=True)

    def start(self) -> SystemMetrics:
        self._thread.start()
        return self

    def _collect(self) -> None:
        for monitor in self.monitors:
            monitor.collect_metrics()
        self._collected += 1

    def _publish(self) -> None:
        metrics: dict[str, Optional[float]] = {}
        for monitor in self.monitors:
            metrics.update({PREFIX + k: v for k, v in monitor.aggregate_metrics().items()})
            monitor.clear_metrics()
        self._collected = 0
        if metrics:
            self.log_metrics(metrics, self.step)
            self.step += 1

    def _loop(self) -> None:
        try:
            while True:
                self._collect()
                if self._collected >= self.samples:
                    self._publish()
                if self._stop.wait(self.interval):
                    return
        except Exception as exc:  # a monitor that fails must not end the run
            log.warning("warning: system metrics stopped: %s", exc)

    def stop(self) -> None:
        """Take a last sample, log what is waiting, end the thread (once; a second call does nothing)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=30)
        try:
            self._collect()
            self._publish()
        except Exception as exc:
            log.warning("warning: last system metrics sample failed: %s", exc)


def next_step(history: Mapping[str, list[tuple[int, float]]]) -> int:
    """The step after the last system metric a journal holds (a resumed run continues its curves)."""
    steps = [step for key, points in history.items() if key.startswith(PREFIX) for step, _ in points]
    return max(steps) + 1 if steps else 0
