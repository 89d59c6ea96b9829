"""Custom Prometheus metrics, served by Triton on its metrics port next to its own nv_* ones.

Takes Triton's `MetricFamily` class as an argument instead of importing `pb_utils`, so the
package stays Triton-free and the same calls are a no-op in tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# vae_encode and control: the image modes' image encoding and control branch (issue 14).
STAGES = ("text_encode", "vae_encode", "control", "denoise", "vae_decode", "image_encode")
STAGE_BUCKETS_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 32]


class Metrics:
    def __init__(self, metric_family: Any = None, labels: dict[str, str] | None = None):
        self._labels = dict(labels or {})
        self._cache: dict[tuple, Any] = {}
        self._families: dict[str, Any] = {}
        if metric_family is None:
            return
        family = metric_family
        spec = {
            "stage": ("zimage_stage_duration_ms",
                      "Time per generation stage (text_encode, vae_encode, control, "
                      "denoise, vae_decode, image_encode) in milliseconds", family.HISTOGRAM),
            "images": ("zimage_images_generated_total", "Images generated", family.COUNTER),
            "errors": ("zimage_request_errors_total", "Requests answered with an error, by code",
                       family.COUNTER),
            "batch": ("zimage_batch_size", "Images per pipeline call", family.HISTOGRAM),
            "adapter_images": ("zimage_adapter_images_total", "Images generated with each "
                               "LoRA adapter, by adapter name", family.COUNTER),
            "wait": ("zimage_batch_wait_ms", "Time a pipeline call waited inside execute() "
                                             "behind earlier calls of the same batch",
                     family.HISTOGRAM),
            "memory": ("zimage_gpu_memory_bytes", "GPU memory this instance's allocator holds "
                                                  "after its last pipeline call, by kind "
                                                  "(allocated, reserved; max_reserved: the "
                                                  "most it ever held)", family.GAUGE),
        }
        self._families = {key: family(name, text, kind) for key, (name, text, kind)
                          in spec.items()}

    def _metric(self, key: str, buckets: Sequence[float] | None = None, **labels: str):
        family = self._families.get(key)
        if family is None:
            return None
        cache_key = (key, tuple(sorted(labels.items())))
        if cache_key not in self._cache:
            all_labels = {**self._labels, **labels}
            self._cache[cache_key] = (family.Metric(labels=all_labels, buckets=list(buckets))
                                      if buckets else family.Metric(labels=all_labels))
        return self._cache[cache_key]

    def stage(self, name: str, milliseconds: float) -> None:
        metric = self._metric("stage", STAGE_BUCKETS_MS, stage=name)
        if metric is not None:
            metric.observe(milliseconds)

    def batch(self, size: int, timings_ms: dict[str, float], waited_ms: float = 0.0) -> None:
        for name in STAGES:
            if name in timings_ms:
                self.stage(name, timings_ms[name])
        for key, buckets, value in (("batch", BATCH_BUCKETS, size),
                                    ("wait", STAGE_BUCKETS_MS, waited_ms)):
            metric = self._metric(key, buckets)
            if metric is not None:
                metric.observe(value)
        images = self._metric("images")
        if images is not None:
            images.increment(size)

    def memory(self, allocated: int, reserved: int, max_reserved: int) -> None:
        for kind, value in (("allocated", allocated), ("reserved", reserved),
                            ("max_reserved", max_reserved)):
            if (metric := self._metric("memory", kind=kind)) is not None:
                metric.set(value)

    def answered(self, codes: Sequence[str | None]) -> None:
        for code in codes:
            if code is not None and (metric := self._metric("errors", code=code)) is not None:
                metric.increment(1)

    def adapter_images(self, adapter_set: Sequence[tuple[str, float]], images: int) -> None:
        """Counts `images` for each adapter of the set (LoRA, issue 13)."""
        for name, _ in adapter_set:
            if (metric := self._metric("adapter_images", adapter=name)) is not None:
                metric.increment(images)
