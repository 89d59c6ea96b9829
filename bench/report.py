"""Turns one benchmark run's raw JSON files into results.json, results.md and a plot.

  python -m bench.report bench/results/2026-11-26-h200x2-b --commit "..."

Each section appears when its files are in the folder: baselines (bench.baselines), the engine
(bench.engine or bench.ablation), the memory modes (memory_*.json), the served runs
(server_1gpu.json, server_all_gpus.json), and issue 15's round two (round2_bf16.json,
round2_fp8.json beside the baselines).
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


def _row(rows: list[dict], switch: str, nth: int = 0) -> dict | None:
    found = [r for r in rows if r["switch"] == switch and "error" not in r]
    return found[nth] if len(found) > nth else None


# Served runs a folder may hold, in the order the main table lists them. Two names kept from
# earlier runs say what their config was; the others are labelled by their commit and overrides.
SERVED = (
    ("server_1gpu_combining", "Triton combining queued requests, SDPA left to pick"),
    ("server_1gpu", None),
    ("server_cudnn", "cuDNN attention named first; warmup at 1024x1024 only"),
    ("server_native", None),
    ("server_fp8", None),
)


def served_label(name: str, data: dict) -> str:
    note = dict(SERVED).get(name)
    if note:
        return note
    changed = [f"`{k}: {v}`" for k, v in data.get("overrides", {}).items()
               if k != "model.load_format"]
    return f"config.yaml of {data['commit']}" + (f" with {', '.join(changed)}" if changed else "")


def main_table(f: Path) -> tuple[list[str], list[tuple[str, str, float]]]:
    eager, compiled = load(f, "diffusers_eager"), load(f, "diffusers_compiled")
    engine, ablation, shapes = load(f, "engine"), load(f, "ablation"), load(f, "shapes")
    rows = []
    if eager:
        rows.append(("diffusers eager, as the model card shows it", "diffusers eager", eager))
    if compiled:
        rows.append(("diffusers + compile_repeated_blocks + compiled VAE decoder + cuDNN "
                     "attention", "diffusers compiled", compiled))
    if engine:
        rows.append(("zimage engine in-process (shipped config, PNG encode included)",
                     "engine in-process", engine))
    if shapes and shapes["rows"]:
        rows.append(("zimage engine in-process, warmed up as the server is (PNG included)",
                     "engine in-process", {**shapes["rows"][0], "commit": shapes["commit"]}))
    if ablation:
        default, fp8 = _row(ablation["rows"], "default"), _row(ablation["rows"], "fp8")
        if default:
            rows.append(("zimage engine in-process, bf16 (one fixed prompt: static shapes; "
                         "PNG included)", "engine in-process bf16",
                         {**default, "commit": ablation["commit"]}))
        if fp8:
            rows.append(("zimage engine in-process, FP8 mode (PNG included)",
                         "engine in-process FP8", {**fp8, "commit": ablation["commit"]}))
    for name, _ in SERVED:
        if served := load(f, name):
            rows.append((f"**zimage on Triton, gRPC client, PNG returned**, 1 GPU: "
                         f"{served_label(name, served)}",
                         "Triton FP8" if name == "server_fp8" else f"Triton ({served['commit']})",
                         {**served["latency"], "commit": served["commit"]}))
    base_eager = eager and eager["median_s"]
    base_compiled = compiled and compiled["median_s"]
    lines = ["| system | commit | median s | p90 s | first request s | vs diffusers eager | "
             "vs diffusers compiled |", "|---|---|---|---|---|---|---|"]
    for label, _, data in rows:
        lines.append(f"| {label} | {data.get('commit', '')} | {data['median_s']:.3f} | "
                     f"{data['p90_s']:.3f} | {data['first_s']:.2f} | "
                     f"{ratio(data['median_s'], base_eager)} | "
                     f"{ratio(data['median_s'], base_compiled)} |")
    if eager and any(data.get("commit") != eager["commit"] for _, _, data in rows):
        lines += ["", f"The baselines ran at commit {eager['commit']}; rows of another commit ran "
                      "on another machine of the same kind, so their ratios cross machines."]
    for name in ("server_fp8", "server_native"):
        if (d := load(f, name)) and d.get("deviation_from_reference"):
            dev = d["deviation_from_reference"]
            lines += ["", f"{served_label(name, d)}: its {dev['images']} timed images against "
                          f"the bf16 images of the same seeds from server_1gpu: mean absolute "
                          f"difference {dev['mean_abs_of_255']} of 255, PSNR {dev['psnr_db']} dB, "
                          f"relative L2 {dev['relative_l2']}."]
    return lines, [(label, short, data["median_s"]) for label, short, data in rows]


def served_stages(f: Path) -> list[str]:
    found = [(name, d) for name, _ in SERVED if (d := load(f, name))]
    if not found:
        return []
    keys = list(found[0][1]["latency"]["stage_ms"])
    lines = ["| run (commit) | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, d in found:
        stages = d["latency"]["stage_ms"]
        lines.append(f"| {name} ({d['commit']}) | " +
                     " | ".join(f"{stages.get(k, 0):.1f}" for k in keys) + " |")
    for name, d in found:
        for line in d.get("served_profile", []):
            lines += ["", f"Inside the server, {name}: {line}"]
    return lines


def shapes_table(shapes: dict) -> list[str]:
    lines = ["| how the blocks were compiled | median s | denoise ms | GPU kernels ms | wall ms "
             "| attention kernel (ms) |", "|---|---|---|---|---|---|"]
    for r in shapes["rows"]:
        p = r["profile_ms"]
        top = p.get("top_kernels_ms", {})
        attention = next(((k, v) for k, v in top.items() if "sdpa" in k or "flash_fwd" in k
                          or "fmha" in k), None)
        cell = f"{attention[0][:60]} ({attention[1]})" if attention else "-"
        lines.append(f"| {r['setting']} | {r['median_s']:.3f} | {r['stage_ms']['denoise']:.1f} "
                     f"| {p['kernels_ms']:.1f} | {p['wall_ms']:.1f} | {cell} |")
    return lines


def served_batching(f: Path) -> list[str]:
    lines = ["| run (commit) | concurrency | images/min | avg latency s |", "|---|---|---|---|"]
    found = False
    for name, _ in SERVED:
        d = load(f, name)
        for row in (d or {}).get("perf_analyzer_512", []):
            found = True
            lines.append(f"| {served_label(name, d)} ({d['commit']}) | {row['concurrency']} | "
                         f"{row['images_per_min']} | {row['avg_latency_s']} |")
    return lines if found else []


def floor_table(floor: dict, served: dict | None) -> list[str]:
    """The matrix work of one image, kernel by kernel, against what the server spent."""
    lines = ["| block | op | shape | ms each | TFLOP/s | per forward |", "|---|---|---|---|---|---|"]
    for r in floor["rows"]:
        shape = f"{r['m']}x{r['k']} by {r['k']}x{r['n']}" if "m" in r else f"sequence {r['seq']}"
        lines.append(f"| {r['block']} | {r['op']} | {shape} | {r['ms']:.3f} | {r['tflops']} | "
                     f"{r['per_forward']} |")
    per = floor["per_image_ms"]
    lines += ["", f"Per image ({floor['steps']} forwards, caption {floor['caption_tokens']} "
                  f"tokens): products {per['gemm']} ms, cuDNN attention {per['attention_cudnn']} "
                  f"ms (FlashAttention-2 {per['attention_flash']} ms); products and the faster "
                  f"attention {per['gemm_plus_best_attention']} ms. The card's 8192-cubed bf16 "
                  f"product runs at {floor['peak_bf16_tflops_8192']} TFLOP/s."]
    if served:
        name, served = served
        total = served["latency"]["median_s"] * 1000
        lines += ["", f"Served end to end, {name} took {total:.0f} ms per image; "
                      f"{total - per['gemm_plus_best_attention']:.0f} ms of it is everything "
                      "but these kernels at this speed (norms, RoPE, gating, text encoder, VAE, "
                      "PNG, transport, idle GPU)."]
    return lines


# In-process A/B runs (bench/gpu.sh steps graphs and qk): file stems, heading, first column,
# and the label of each side.
AB_RUNS = (
    (("graphs_off", "graphs_on"), "Text encoder CUDA graphs", "text encoder",
     ("compiled, no CUDA graphs", "compiled, CUDA graphs")),
    (("qk_off", "qk_on"), "q/k norms and RoPE: torch.compile's kernels or the qk_norm_rope kernel",
     "q/k norms and RoPE", ("torch.compile", "`qk_norm_rope: true`")),
)


def ab_table(column: str, runs: list[tuple[str, dict]]) -> list[str]:
    lines = [f"| {column} | median s | text_encode ms | denoise ms | VAE ms | PNG ms |",
             "|---|---|---|---|---|---|"]
    for label, d in runs:
        st = d["stage_ms"]
        lines.append(f"| {label} | {d['median_s']:.3f} | {st['text_encode']:.1f} | "
                     f"{st['denoise']:.1f} | {st['vae_decode']:.1f} | {st['image_encode']:.1f} |")
    return lines


def ablation_table(ablation: dict) -> list[str]:
    rows = ablation["rows"]
    default = _row(rows, "default")
    lines = ["| switch | setting | median s | vs default | text ms | denoise ms | VAE ms | "
             "PNG ms | first image s | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["switch"] == "batching":
            continue
        if "error" in r:
            lines.append(f"| {r['switch']} | {r['setting']} | failed | | | | | | | "
                         f"{r['error'][:120]} |")
            continue
        s = r["stage_ms"]
        lines.append(
            f"| {r['switch']} | {r['setting']} | {r['median_s']:.3f} | "
            f"{ratio(r['median_s'], default and default['median_s'])} | {s['text_encode']:.1f} | "
            f"{s['denoise']:.1f} | {s['vae_decode']:.1f} | {s['image_encode']:.1f} | "
            f"{r['first_s']:.2f} | {r.get('note', '')} |")
    return lines


def batching_table(ablation: dict) -> list[str]:
    rows = [r for r in ablation["rows"] if r["switch"] == "batching"]
    if not rows:
        return []
    lines = ["| size, images per pipeline call | seconds per call | images per second |",
             "|---|---|---|"]
    lines += [f"| {r['setting']} | {r['median_s']:.3f} | {r['images_per_s']:.3f} |" for r in rows]
    return lines


def memory_table(f: Path, ablation: dict | None) -> list[str]:
    lines = ["| memory_mode | compile | median s per image | peak GPU memory (allocated) |",
             "|---|---|---|---|"]
    default = ablation and _row(ablation["rows"], "default")
    shapes = load(f, "shapes")
    default = default or (shapes and shapes["rows"] and shapes["rows"][0])
    if default:
        lines.append(f"| performance (default) | on | {default['median_s']:.3f} | "
                     f"{default['peak_gib']:.2f} GiB |")
    found = False
    for name in ("memory_balanced", "memory_balanced_eager", "memory_memory_constrained"):
        data = load(f, name)
        if not data:
            continue
        found = True
        mode = data["overrides"]["optimizations.memory_mode"]
        compiled = "off" if data["overrides"].get("optimizations.torch_compile.enabled") is False \
            or mode == "memory_constrained" else "on"
        lines.append(f"| {mode} | {compiled} | {data['median_s']:.3f} | "
                     f"{data['peak_gib']:.2f} GiB |")
    return lines if found else []


def scaling(one: dict | None, every: dict | None) -> list[str]:
    lines = ["| concurrency | 1 GPU: images/min (avg latency) | all GPUs: images/min "
             "(avg latency) |", "|---|---|---|"]
    table: dict[int, list] = {}
    for column, data in ((0, one), (1, every)):
        for row in (data or {}).get("perf_analyzer", []):
            table.setdefault(row["concurrency"], [None, None])[column] = row
    for c in sorted(table):
        cells = [("failed (see the .perf_analyzer.log)" if not r["ok"] else
                  f"{r['images_per_min']:.1f} ({r['avg_latency_s']:.2f} s)") if r else "-"
                 for r in table[c]]
        lines.append(f"| {c} | {cells[0]} | {cells[1]} |")
    best = [max((r["images_per_min"] for r in (d or {}).get("perf_analyzer", []) if r["ok"]),
                default=None) for d in (one, every)]
    if (every or {}).get("images_by_device"):
        lines += ["", "Images each instance generated during the all-GPU load test: " +
                  ", ".join(f"{d} {n:.0f}" for d, n in sorted(every["images_by_device"].items()))
                  + "."]
    if all(best):
        lines += ["", f"Saturation (best of the concurrencies): {best[1]:.1f} against "
                      f"{best[0]:.1f} images/min, {ratio(best[1], best[0])}. Latency at "
                      f"concurrency 1: {every['latency']['median_s']:.3f} s with all GPUs, "
                      f"{one['latency']['median_s']:.3f} s with one "
                      f"({ratio(every['latency']['median_s'], one['latency']['median_s'])})."]
    return lines


def gpu_memory(every: dict | None) -> list[str]:
    procs = (every or {}).get("gpu_processes")
    if not procs:
        return []
    lines = ["| process (pid) | GPU | memory (nvidia-smi) |", "|---|---|---|"]
    lines += [f"| {a['pid']} | {a['gpu']} | {a['used_mib']} MiB |"
              for a in procs["nvidia_smi_apps"]]
    lines += ["", f"Instances: {', '.join(procs['instances'])}. Each instance process's "
                  "allocator, per visible GPU (its startup log line):", ""]
    lines += [f"- {held}" for held in procs["allocator_by_gpu"]]
    return lines


# Issue 15's targets for one card (not measurements): median seconds per image through the
# server, keyed by (run, size); then launch to ready.
# round2_candidates is bf16 with the switches still off by default turned on: the same targets.
ROUND2_LATENCY_TARGETS = {(run, size): target for run in ("round2_bf16", "round2_candidates")
                          for size, target in ((1024, 0.80), (512, 0.20), (256, 0.08))}
ROUND2_LATENCY_TARGETS[("round2_fp8", 1024)] = 0.52
ROUND2_START_TARGETS = {(run, key): target for run in ("round2_bf16", "round2_candidates")
                        for key, target in (("cold_start_s", 120), ("warm_restart_s", 20))}
ROUND2_SERVED = (("round2_bf16", "ours, shipped config (bf16)"),
                 ("round2_candidates", "ours, bf16 with transformer graphs, static VAE code "
                                       "and the text encoder stack"),
                 ("round2_fp8", "ours, `optimizations.fp8: true`"))
STARTS = (("cold_start_s", "startup_phases_cold", "cold start (empty compile cache)"),
          ("start_with_cache_s", "startup_phases_with_cache", "start with a compile cache"),
          ("warm_restart_s", "startup_phases_warm", "warm restart (compile cache kept)"))


def served_sizes(d: dict) -> dict[int, dict]:
    """A bench.server run's latency per size: its first size, then --sizes' others."""
    return {d["size"]: d["latency"],
            **{int(k): v for k, v in d.get("latency_other_sizes", {}).items()}}


def against(value: float, target: float | None) -> tuple[str, str]:
    if target is None:
        return "-", "-"
    return f"<= {target:g} s", "met" if value <= target else "**not met**"


def phases_text(phases: dict) -> str:
    return ", ".join(f"{k} ({phases_text(v)})" if isinstance(v, dict) else f"{k} {v}"
                     for k, v in phases.items())


def round_two(f: Path) -> list[str]:
    """Issue 15's one-card run (bench/gpu.sh round2diffusers, round2bf16, round2fp8): latency
    per size against diffusers compiled at its size, the targets, the start times."""
    runs = {name: d for name in ("diffusers_eager", "diffusers_compiled", "round2_bf16",
                                 "round2_candidates", "round2_fp8") if (d := load(f, name))}
    if not any(name.startswith("round2") for name in runs):
        return []
    compiled = runs.get("diffusers_compiled")
    rows = [(label, name, d["size"], d) for name, label in
            (("diffusers_eager", "diffusers eager"), ("diffusers_compiled", "diffusers compiled"))
            if (d := runs.get(name))]
    rows += [(label, name, size, {**lat, "commit": runs[name]["commit"]})
             for name, label in ROUND2_SERVED if name in runs
             for size, lat in served_sizes(runs[name]).items()]
    lines = ["| run | size | commit | median s | p90 s | vs diffusers compiled | denoise ms "
             "(METADATA) | target | |", "|---|---|---|---|---|---|---|---|---|"]
    for label, name, size, d in rows:
        base = compiled["median_s"] if compiled and compiled["size"] == size else None
        denoise = d.get("stage_ms", {}).get("denoise")
        target, met = against(d["median_s"], ROUND2_LATENCY_TARGETS.get((name, size)))
        lines.append(f"| {label} | {size}x{size} | {d['commit']} | {d['median_s']:.3f} | "
                     f"{d['p90_s']:.3f} | {ratio(d['median_s'], base) if base else '-'} | "
                     f"{f'{denoise:.1f}' if denoise is not None else '-'} | {target} | {met} |")
    lines += ["", "| run | start | seconds | target | | startup phases (s) |",
              "|---|---|---|---|---|---|"]
    for name, label in ROUND2_SERVED:
        d = runs.get(name, {})
        for key, phases_key, start in STARTS:
            if key in d:
                target, met = against(d[key], ROUND2_START_TARGETS.get((name, key)))
                phases = phases_text(d[phases_key]) if phases_key in d else "-"
                lines.append(f"| {label} | {start} | {d[key]:.1f} | {target} | {met} | "
                             f"{phases} |")
    for name, what in (("round2_fp8", "FP8's"), ("round2_candidates", "The candidates'")):
        if dev := runs.get(name, {}).get("deviation_from_reference"):
            lines += ["", f"{what} {dev['images']} timed images at {runs[name]['size']}x"
                          f"{runs[name]['size']} against the bf16 run's of the same seeds: "
                          f"mean absolute difference {dev['mean_abs_of_255']} of 255, PSNR "
                          f"{dev['psnr_db']} dB, relative L2 {dev['relative_l2']}."]
    cards = sorted({f"{d['card']['name']} ({name})" for name, d in runs.items()})
    names = {d["card"]["name"] for d in runs.values()}
    lines += ["", f"Card: {next(iter(names))}." if len(names) == 1 else
              f"**Not one card**: {', '.join(cards)}."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--commit", default=None, help="when the GPU machine had no git")
    parser.add_argument("--command", default="see NOTES.md")
    args = parser.parse_args()
    f = args.folder
    ablation, one, every = load(f, "ablation"), load(f, "server_1gpu"), load(f, "server_all_gpus")
    oom = load(f, "oom_h100")
    first = next(d for d in (one, every, ablation, load(f, "diffusers_eager"),
                             load(f, "round2_bf16"), load(f, "round2_fp8")) if d)
    card = first["card"]
    table, medians = main_table(f)
    lines = ["# Benchmark: Z-Image-Turbo shape, random bf16 weights, 1024x1024, 8 steps, "
             "guidance 0, batch 1", "",
             f"Card: {card['name']} ({card.get('memory_gib')} GiB), torch {card.get('torch')}; "
             f"date {first['date'][:10]}; commit {args.commit or first['commit']}.", "",
             f"Command: {args.command}", ""]
    if two := round_two(f):
        lines += ["## Round two (issue 15): one card, 8 steps, PNG over gRPC, sizes as listed", "",
                  *two, "", "## All runs in this folder, 1024x1024", ""]
    lines += table
    if stages := served_stages(f):
        lines += ["", "Where the time goes through Triton (median ms per image, 1 GPU):", "",
                  *stages]
    starts = [(name, d) for name in [n for n, _ in SERVED] + ["server_all_gpus"]
              if (d := load(f, name))]
    for name, d in starts:
        if "cold_start_s" in d:
            line = (f"Cold start of {name} ({d['commit']}, launch to ready, compile and warmup "
                    f"included): {d['cold_start_s']:.1f} s")
            if "warm_restart_s" in d:
                line += (f"; warm restart with the compile cache kept: {d['warm_restart_s']:.1f} s "
                         f"({ratio(d['warm_restart_s'], d['cold_start_s'])} of cold)")
            lines += ["", line + "."]
    if floor := load(f, "floor"):
        lines += ["", "## The matrix work alone: each kernel timed by itself on the card", "",
                  *floor_table(floor, next(((n, d) for n in ("server_native", "server_1gpu")
                                            if (d := load(f, n))), None))]
    for (off_name, on_name), heading, column, labels in AB_RUNS:
        if (off := load(f, off_name)) and (on := load(f, on_name)):
            lines += ["", f"## {heading}, in-process ({on['card']['name']}, commit "
                          f"{on['commit']})", "", *ab_table(column, list(zip(labels, (off, on))))]
    if shapes := load(f, "shapes"):
        lines += ["", "## Compiled shapes, in-process: not what slowed serving (the served attention kernel did)", "",
                  *shapes_table(shapes)]
    if batching := served_batching(f):
        lines += ["", "## Batching through Triton at 512x512 (perf_analyzer's mixed prompts)", "",
                  *batching]
    if ablation:
        lines += ["", "## Ablation: one switch flipped per row, same process, same GPU", "",
                  *ablation_table(ablation)]
        if ablation.get("fp8_deviation"):
            d = ablation["fp8_deviation"]
            lines += ["", f"FP8 against bf16 on the same seeds (decoded pixels): mean absolute "
                          f"difference {d['mean_abs_of_255']} of 255, PSNR {d['psnr_db']} dB, "
                          f"relative L2 {d['relative_l2']}."]
        for key, label in (("profile_ms", "bf16"), ("fp8_profile_ms", "FP8")):
            if ablation.get(key):
                p = ablation[key]
                lines += ["", f"Kernel time for one image, {label} (torch.profiler, ms): " +
                          ", ".join(f"{k} {v}" for k, v in p.items())]
        if batching := batching_table(ablation):
            lines += ["", "## Batching: several prompts in one pipeline call", "", *batching]
    if memory := memory_table(f, ablation):
        lines += ["", "## Memory modes", "", *memory]
    if one or every:
        title = "Scaling" if every else "Throughput"
        lines += ["", f"## {title}: perf_analyzer through Triton (gRPC, PNG, 1024x1024)", "",
                  *scaling(one, every)]
    if gpu := gpu_memory(every):
        lines += ["", "## Memory per GPU with one instance per GPU", "", *gpu]
    if oom:
        lines += ["", f"Out-of-memory recovery ({oom['card']['name']}, memory budget "
                      f"{oom['memory_budget_gib']} GiB): a {oom['huge_request']} request got "
                      f"`{oom['huge_error_code']}` in {oom['huge_answer_s']} s; allocated memory "
                      f"{oom['memory_before']['allocated_gib']} GiB before, "
                      f"{oom['memory_after_oom']['allocated_gib']} GiB after; the next 1024x1024 "
                      f"request {'succeeded' if oom['next_request_ok'] else 'FAILED'}."]
    lines += ["", "Random weights: timings only, never image quality."]
    (f / "results.md").write_text("\n".join(lines) + "\n")
    summary = {"card": card, "rows": [{"system": s, "median_s": m} for s, _, m in medians],
               "ablation": ablation, "server_1gpu": one, "server_all_gpus": every, "oom": oom,
               "floor": load(f, "floor"), "server_native": load(f, "server_native"),
               "server_fp8": load(f, "server_fp8"),
               "round2_bf16": load(f, "round2_bf16"), "round2_fp8": load(f, "round2_fp8")}
    (f / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(f, medians, one, every, card)
    print("\n".join(lines))


def plot(folder: Path, medians, one, every, card) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    left.barh([short for _, short, _ in medians][::-1], [m for _, _, m in medians][::-1],
              color="#4a90d9")
    left.set_xlabel("median seconds per image")
    left.set_title("Latency, 1024x1024, 8 steps, batch 1")
    for data, label in ((one, "1 GPU"), (every, "all GPUs")):
        points = [(r["concurrency"], r["images_per_min"]) for r in
                  (data or {}).get("perf_analyzer", []) if r["ok"]]
        if points:
            right.plot(*zip(*points), marker="o", label=label)
    right.set_xlabel("concurrent requests (perf_analyzer)")
    right.set_ylabel("images per minute")
    right.set_title("Throughput through Triton")
    right.legend()
    fig.suptitle(f"{card['name']}, random weights (timing only)")
    fig.tight_layout()
    fig.savefig(folder / "latency_throughput.png", dpi=110)


if __name__ == "__main__":
    main()
