"""Render the benchmark results in benchmarks/results/*.json as PNG charts in docs/img/.

    pip install matplotlib          # a benchmark extra: pip install -e '.[bench]'
    python benchmarks/plot.py [--results benchmarks/results] [--out docs/img]

One chart per result file it knows (a file it does not know is listed and skipped); each
chart's title names the benchmark's date and machine.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _subtitle(doc: dict) -> str:
    m = doc["machine"]
    feats = "/".join(f for f in m["features"] if f.startswith("avx")) or "no AVX"
    return f"{doc['date']}, {m['cpu']} ({feats}), {m['threads']} threads, torch {m['torch']}"


def cpu_builtins(doc: dict, plt):
    rows = doc["rows"]
    peers = [("torch", "torch backend (its default form)"),
             ("best_seq", "torch eager / torch.compile, same sequential program"),
             ("fla_naive", "FLA naive torch code")]
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(rows) + 1.8))
    h = 0.27
    for i, (key, label) in enumerate(peers):
        ys, xs = [], []
        for j, r in enumerate(rows):
            ms = r["ms"]
            peer = (min(ms["torch_seq"], ms["compiled_seq"]) if "torch_seq" in ms else None) \
                if key == "best_seq" else ms.get(key)
            if peer is not None:
                ys.append(j + (i - 1) * h)
                xs.append(peer / ms["tvm"])
        ax.barh(ys, xs, height=h, label=label)
    ax.set_yticks(range(len(rows)), [r["op"] for r in rows])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("speedup of recurkit's TVM kernel (peer time / recurkit time, log scale)")
    s = doc["shape"]
    ax.set_title(f"CPU forward, B=1 T={s['T']} H={s['H']} K=V={s['K']} (vector states "
                 f"D={s['D']}), fp32\n{_subtitle(doc)}", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=2,
              frameon=False)
    return fig


def gdn_scaling(doc: dict, plt):
    rows = doc["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in rows[0]["ms"]:
        ax.plot([r["T"] for r in rows], [r["ms"][name] for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("ms per forward (log scale)")
    s = doc["shape"]
    ax.set_title(f"Gated DeltaNet forward on CPU, B=1 H={s['H']} K=V={s['K']}, fp32\n"
                 f"{_subtitle(doc)}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def shift_add_cpu(doc: dict, plt):
    rows = doc["rows"]
    shapes = sorted({r["shape"] for r in rows}, key=lambda s: int(s.split("x")[0]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sel = {r["path"]: r for r in rows if r["shape"] == shape}
        base = sel["torch F.linear fp32"]
        paths = [p for p in sel if p != "torch F.linear fp32"]
        for k, mode in enumerate(("ms_idle", "ms_b2b")):
            ax.barh([i + (k - 0.5) * 0.4 for i in range(len(paths))],
                    [base[mode] / sel[p][mode] for p in paths], height=0.4,
                    label="after idle (cold)" if mode == "ms_idle" else "back to back")
        ax.set_yticks(range(len(paths)), [p.replace("recurkit ", "") for p in paths],
                      fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xlabel("speedup over fp32 F.linear")
        ax.set_title(f"batch-1 GEMV {shape}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"Shift-add matmul on CPU (group {doc['group']})\n{_subtitle(doc)}",
                 fontsize=9)
    fig.tight_layout()
    return fig


CHARTS = {"cpu_builtins": cpu_builtins, "gdn_scaling": gdn_scaling,
          "shift_add_cpu": shift_add_cpu}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--out", default=os.path.join(HERE, "..", "docs", "img"))
    args = ap.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py needs matplotlib: pip install matplotlib (or the 'bench' extra)",
              file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    for path in sorted(glob.glob(os.path.join(args.results, "*.json"))):
        with open(path) as f:
            doc = json.load(f)
        draw = CHARTS.get(doc.get("benchmark"))
        if draw is None:
            print(f"skipped {os.path.relpath(path)}: no chart for {doc.get('benchmark')!r}")
            continue
        fig = draw(doc, plt)
        out = os.path.join(args.out, f"{doc['benchmark']}.png")
        fig.savefig(out, dpi=110, bbox_inches="tight")
        plt.close(fig)
        print(f"wrote {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
