"""Print one markdown table from a pytest-benchmark JSON: each case's median and its speedup over
the `baseline` (or `reference`) and `amp` variants measured in the same run.

Benchmarks name their case with `benchmark.group` and their variant with `extra_info["variant"]`
(else the test's parameter id); extra_info keys such as images_per_s or peak_mem_mb become columns."""
import json
import sys
from collections import defaultdict

EXTRA = ("images_per_s", "tflops", "pct_peak", "pct_copy_bound", "peak_mem_mb")


def rows(path):
    data = json.load(open(path))
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        variant = info.get("variant") or (b.get("param") or b["name"])
        group = b.get("group") or b["name"].split("[")[0]
        groups[group][variant] = (b["stats"]["median"], info)
    return groups


def main(bench_json, env_txt=None):
    if env_txt:
        print("".join(open(env_txt).readlines()).strip(), "\n")
    groups = rows(bench_json)
    print("| case | variant | median ms | vs baseline | vs amp | " + " | ".join(EXTRA) + " |")
    print("|---|---|---|---|---|" + "---|" * len(EXTRA))
    for group in sorted(groups):
        vs = groups[group]
        base = vs.get("baseline", vs.get("reference", (None,)))[0]
        amp = vs.get("amp", (None,))[0]
        for variant, (med, info) in sorted(vs.items(), key=lambda kv: -kv[1][0]):
            sb = f"{base / med:.2f}x" if base else ""
            sa = f"{amp / med:.2f}x" if amp else ""
            extra = " | ".join(f"{info[k]:.4g}" if isinstance(info.get(k), (int, float)) else "" for k in EXTRA)
            print(f"| {group} | {variant} | {med * 1e3:.3f} | {sb} | {sa} | {extra} |")
    shares = [(g, v, i["profile_share"]) for g in sorted(groups) for v, (_, i) in groups[g].items()
              if i.get("profile_share")]
    if shares:
        print("\nShare of training-step time per part (%, from torch.profiler; VGG lies inside losses):")
        for g, v, share in shares:
            print(f"- {g} / {v}: " + ", ".join(f"{k} {p}" for k, p in share.items()))


if __name__ == "__main__":
    main(*sys.argv[1:])
