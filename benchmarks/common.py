"""Shared benchmark plumbing: timing, peak anonymous memory, the CLIP ViT-B/32 layout, table and JSON output."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import torch

from pyfuse.io.atomic import atomic_path
from pyfuse.memory import PeakRssAnon, rss_anon_bytes  # noqa: F401  (re-exported to the benchmarks)


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def clip_vit_shapes(hidden: int = 768, layers: int = 12, mlp_ratio: int = 4, patch: int = 32, positions: int = 50):
    """The 199 parameter shapes of Hugging Face's CLIPVisionModel (ViT-B/32 at the defaults), in its order."""
    shapes = [(hidden,), (hidden, 3, patch, patch), (positions, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        for _ in range(4):  # k, v, q, out projections
            shapes += [(hidden, hidden), (hidden,)]
        shapes += [(hidden,), (hidden,)]
        shapes += [(mlp_ratio * hidden, hidden), (mlp_ratio * hidden,), (hidden, mlp_ratio * hidden), (hidden,)]
        shapes += [(hidden,), (hidden,)]
    shapes += [(hidden,), (hidden,)]
    return shapes


def clip_like_shapes(target_numel: int):
    """199 CLIP-ViT-shaped tensors whose width is scaled so the total is close to `target_numel`."""
    full = sum(torch.Size(s).numel() for s in clip_vit_shapes())
    hidden = max(8, round(768 * (target_numel / full) ** 0.5 / 8) * 8)
    return clip_vit_shapes(hidden=hidden)


def parse_size(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}
    return int(float(text[:-1]) * scale[text[-1].upper()]) if text[-1].upper() in scale else int(text)


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format)."""
    headers = [h for _, h, _ in columns]
    cells = [[("" if r.get(k) is None else format(r[k], f)) for k, _, f in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))
