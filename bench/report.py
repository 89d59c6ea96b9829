"""Turns one benchmark run's raw JSON files into results.json, results.md and a plot.

  python -m bench.report bench/results/2026-11-26-h200x2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--commit", default=None, help="when the GPU machine had no git")
    parser.add_argument("--command", default="bash bench/gpu.sh setup baselines engine venv "
                                              "serve serve2")
    args = parser.parse_args()
    f = args.folder
    eager, compiled = load(f, "diffusers_eager"), load(f, "diffusers_compiled")
    engine, one, every = load(f, "engine"), load(f, "server_1gpu"), load(f, "server_all_gpus")
    oom = load(f, "oom_h100")
    card = (one or engine or eager)["card"]
    rows = []
    for label, data, median in (
        ("diffusers eager, as the model card shows it", eager, eager and eager["median_s"]),
        ("diffusers + compile_repeated_blocks + compiled VAE decoder + cuDNN attention",
         compiled, compiled and compiled["median_s"]),
        ("zimage engine in-process (shipped config, PNG encode included)", engine,
         engine and engine["median_s"]),
        ("**zimage on Triton, gRPC client, PNG returned** (1 GPU)", one,
         one and one["latency"]["median_s"]),
    ):
        if data is None:
            continue
        first = data.get("first_s", data.get("latency", {}).get("first_s"))
        p90 = data.get("p90_s", data.get("latency", {}).get("p90_s"))
        rows.append((label, median, p90, first))
    base_eager = eager and eager["median_s"]
    base_compiled = compiled and compiled["median_s"]
    lines = ["# Benchmark: Z-Image-Turbo shape, random bf16 weights, 1024x1024, 8 steps, "
             "guidance 0, batch 1", "",
             f"Card: {card['name']} x{card['count']} ({card.get('memory_gib')} GiB), "
             f"torch {card.get('torch')}; date {(one or eager)['date'][:10]}; "
             f"commit {args.commit or (one or eager)['commit']}.", "",
             f"Command: `{args.command}` (see bench/README.md).", "",
             "| system | median s | p90 s | first request s | vs diffusers eager | "
             "vs diffusers compiled |", "|---|---|---|---|---|---|"]
    for label, median, p90, first in rows:
        lines.append(f"| {label} | {median:.3f} | {p90:.3f} | {first:.2f} | "
                     f"{ratio(median, base_eager)} | {ratio(median, base_compiled)} |")
    if one:
        stages = one["latency"]["stage_ms"]
        lines += ["", "Where the time goes through Triton (median ms per image, 1 GPU):", "",
                  "| " + " | ".join(stages) + " |", "|" + "---|" * len(stages),
                  "| " + " | ".join(f"{v:.1f}" for v in stages.values()) + " |"]
        lines += ["", f"Cold start (launch to ready, compile included): {one['cold_start_s']:.1f} s;"
                      f" warm restart with the compile cache kept: "
                      f"{one.get('warm_restart_s', float('nan')):.1f} s "
                      f"({ratio(one.get('warm_restart_s'), one['cold_start_s'])} of cold)."]
    if one or every:
        lines += ["", "perf_analyzer, images per minute (gRPC, PNG, 1024x1024):", "",
                  "| concurrency | 1 GPU | all GPUs |", "|---|---|---|"]
        table: dict[int, list] = {}
        for column, data in ((0, one), (1, every)):
            for row in (data or {}).get("perf_analyzer", []):
                table.setdefault(row["concurrency"], [None, None])[column] = row
        for c in sorted(table):
            cells = [("failed: perf_analyzer exited non-zero (its log was not kept)" if not r["ok"] else
                      f"{r['images_per_min']:.1f} ({r['avg_latency_s']:.2f} s avg)")
                     if r else "-" for r in table[c]]
            lines.append(f"| {c} | {cells[0]} | {cells[1]} |")
    if oom:
        lines += ["", f"Out-of-memory recovery ({oom['card']['name']}, memory budget "
                      f"{oom['memory_budget_gib']} GiB): a {oom['huge_request']} request got "
                      f"`{oom['huge_error_code']}` in {oom['huge_answer_s']} s; allocated memory "
                      f"{oom['memory_before']['allocated_gib']} GiB before, "
                      f"{oom['memory_after_oom']['allocated_gib']} GiB after; the next 1024x1024 "
                      f"request {'succeeded' if oom['next_request_ok'] else 'FAILED'}."]
    lines += ["", "Random weights: timings only, never image quality."]
    (f / "results.md").write_text("\n".join(lines) + "\n")
    summary = {"card": card, "rows": [dict(zip(("system", "median_s", "p90_s", "first_s"), r))
                                      for r in rows],
               "server_1gpu": one, "server_all_gpus": every, "oom": oom}
    (f / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(f, rows, one, every, card)
    print("\n".join(lines))


def plot(folder: Path, rows, one, every, card) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = ["diffusers\neager", "diffusers\ncompiled", "engine\nin-process", "Triton\ngRPC+PNG"]
    left.bar(labels[:len(rows)], [r[1] for r in rows], color=["#999", "#999", "#4a90d9",
                                                               "#1f5fa8"][:len(rows)])
    left.set_ylabel("median seconds per image")
    left.set_title("Latency, 1024x1024, 8 steps, batch 1")
    for column, data, label in ((0, one, "1 GPU"), (1, every, "all GPUs")):
        points = [(r["concurrency"], r["images_per_min"]) for r in
                  (data or {}).get("perf_analyzer", []) if r["ok"]]
        if points:
            right.plot(*zip(*points), marker="o", label=label)
    right.set_xlabel("concurrent requests (perf_analyzer)")
    right.set_ylabel("images per minute")
    right.set_title("Throughput through Triton")
    right.legend()
    fig.suptitle(f"{card['name']} x{card['count']}, random weights (timing only)")
    fig.tight_layout()
    fig.savefig(folder / "latency_throughput.png", dpi=110)


if __name__ == "__main__":
    main()
