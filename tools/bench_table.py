"""Render the README's performance table from one `rsnorm bench --scaling --json FILE` run.

    python tools/bench_table.py docs/bench.json

Prints the Markdown table (one row per workload: rsnorm's median time, % of a same-size copy,
ratios to each peer, thread scaling and a copy's own thread scaling) and a summary line of medians, so the README quotes one
run exactly as measured.
"""

from __future__ import annotations

import argparse
import json
import statistics

PEERS = ("numpy", "torch", "onnxruntime")


def fmt_time(s: float) -> str:
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs" if s < 1e-4 else f"{s * 1e6:.0f} µs"


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}×"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="a bench JSON written with --json")
    a = ap.parse_args()
    with open(a.json, encoding="utf-8") as fh:
        d = json.load(fh)
    print("| workload (float32 unless said) | rsnorm | % copy | vs NumPy | vs PyTorch "
          "| vs onnxruntime | 2 threads vs 1 | copy: 2 vs 1 |")
    print("|---|---|---|---|---|---|---|---|")
    peer_ratios, peer_ratios_out = [], []
    for r in d["results"]:
        rs = r["impls"].get("rsnorm")
        if rs is None:
            continue
        ratios = r.get("ratios", {})
        name = r["workload"].removesuffix(" f32")
        pct = rs.get("pct_copy")
        tiny = "tiny" in r["workload"]
        scaling = r.get("thread_scaling")
        cells = [name, fmt_time(rs["median_s"]),
                 "–" if pct is None or tiny else f"{pct:.0f}"]
        cells += [fmt_ratio(ratios.get(p)) for p in PEERS]
        cells.append(fmt_ratio(scaling))
        copy = r.get("copy", {})
        one, many = copy.get("single_median_s"), copy.get("threaded_median_s")
        # Where one thread copied faster (small inputs: Python's thread pool costs more than
        # the copy) the copy's scaling says nothing about the memory system.
        threaded = copy.get("method") == "threaded"
        cells.append(fmt_ratio(one / many if one and many and threaded else None))
        print("| " + " | ".join(cells) + " |")
        peers = [ratios[p] for p in ("torch", "onnxruntime") if p in ratios]
        if peers:
            peer_ratios.append(min(peers))
        peers_out = [r.get("ratios_out", {}).get(p) for p in ("torch", "onnxruntime")]
        peers_out = [p for p in peers_out if p is not None]
        if peers_out:
            peer_ratios_out.append(min(peers_out))
    summ = d.get("summary", {})
    m = d.get("machine", {})
    print()
    print(f"median vs the faster peer {statistics.median(peer_ratios):.2f}× "
          f"(with out= {statistics.median(peer_ratios_out):.2f}×), "
          f"vs NumPy {summ.get('ratios.numpy.median', float('nan')):.1f}×, "
          f"% of copy {summ.get('rsnorm.pct_copy.median', float('nan')):.0f}, "
          f"thread scaling {summ.get('thread_scaling.median', float('nan')):.2f}× "
          f"(a copy's {summ.get('copy_scaling.median', float('nan')):.2f}×); "
          f"{m.get('processor')}, {m.get('cpus')} CPUs, {d.get('threads')} threads, "
          f"SIMD {m.get('build_info', {}).get('simd')}, build profile "
          f"{m.get('build_info', {}).get('profile')}")


if __name__ == "__main__":
    main()
