"""OUT/breakdown.jsonl + OUT/e2e.jsonl -> OUT/summary.json (card, versions, the ratios issue targets are
stated in) and OUT/summary.md (every row as a table). A ratio is baseline time / fast time (> 1: fast wins),
or null where either side was not measured. `ratios` use the time per call as a user sees it (do_bench
median, host overhead included where the host falls behind); `ratios_gpu_time` the kernels' own time.

    python benchmarks/gpu_summary.py OUT_DIR
"""
import datetime
import json
import os
import sys


def load(path):
    if not os.path.exists(path):
        return []
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut off by a timeout
            pass
    return rows


def achieved(e2e, roofline):
    """Per end-to-end row with a GPU-time split, the rates its kernel classes reached: the convolution
    libraries' TFLOP/s and our fused DMFB kernels' TFLOP/s, from the FLOPs benchmarks/roofline.py counts for
    the same case and variant (compiled and CUDA-graph variants counted as their eager base)."""
    counts = {(r["case"], r["variant"]): r["by_class"] for r in roofline}
    for r in e2e:
        split = r.get("gpu_ms_by_class")
        base = r.get("variant", "") if "(no recompute)" in r.get("variant", "") else r.get("variant", "").split("+")[0]
        flops = counts.get((r.get("case"), base))
        if not split or not flops:
            continue
        rates = {}
        for cls, counted in (("conv/matmul libraries", "conv/matmul"), ("fused DMFB (ours)", "fused DMFB (ours)")):
            if split.get(cls) and counted in flops:
                rates[cls + " TFLOP/s"] = round(flops[counted]["gflop"] / split[cls], 1)
        r["achieved"] = rates


# the training step's fast configurations (train.py --amp; with --cuda-graphs; with --compile, and its
# reduce-overhead mode)
BEST_FAST = ("fast", "fast+graphs", "fast+compile (traced)", "fast+compile-ro (traced)")


def step_parity(e2e):
    """Per compiled training-step row, the largest relative difference of its first steps' loss terms (fixed
    weights and batch; the second step's follow from the first's gradients) from the eager row with the same
    ops: fast+compile* against fast, amp+compile* against amp. bf16 rounding alone moves a term by up to
    about 1e-2. (Rows of the fourth session hold the first step alone, as first_step_terms.)"""
    def terms(r):
        return r.get("first_steps_terms") or ([r["first_step_terms"]] if r.get("first_step_terms") else [])
    steps = [r for r in e2e if r.get("case", "").startswith("train step") and terms(r)]
    eager = {r["variant"]: terms(r) for r in steps}
    out = {}
    for r in steps:
        v, ref = r["variant"], eager.get(r["variant"].split("+")[0])
        if "+compile" in v and ref:
            out[v] = round(max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12)
                               for a, b in zip(terms(r), ref) for k in b if k in a), 5)
    return out


def latest_roofline():
    """The newest committed benchmarks/results/*-cpu-roofline.json (roofline.py's counts), or []."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    paths = sorted(f for f in os.listdir(folder) if f.endswith("-cpu-roofline.json")) if os.path.isdir(folder) else []
    return json.load(open(os.path.join(folder, paths[-1]))) if paths else []


# The centroid backward's plan switch (dmfn_fast/ops/centroid_align.py's MEASURED_PLANS takes forward plans)
BACKWARD_PLAN_SWITCHES = ("DMFN_CENTROID_GRAD_ROWS",)
# The record_function ranges the e2e rows' GPU time counted as kernels before s10 (e2e_common.device_kernel_ms)
ANNOTATIONS = ("G forward", "D forward (G step)", "losses", "VGG", "G backward", "D step", "optimizer")


def kernels_only(row):
    """An e2e row from before the fix, its GPU time without the annotation ranges among its top kernels
    (each counted the kernels inside it a second time); a range shorter than the last listed kernel stays
    in, and the row says so (gpu_ms_annotations_left_under_ms)."""
    if row.get("gpu_ms_kernels_only") or not row.get("top_kernels") or row.get("gpu_ms") is None:
        return row
    ann = [k for k in row["top_kernels"] if k[0] in ANNOTATIONS or k[0].startswith("## ")]
    if ann:
        cut = sum(k[2] for k in ann)
        row = dict(row, gpu_ms=round(row["gpu_ms"] - cut, 3), gpu_ms_annotations_removed=round(cut, 3),
                   top_kernels=[k for k in row["top_kernels"] if k not in ann])
        by_class = dict(row["gpu_ms_by_class"])
        for _, cls, ms in ann:  # each from the class the row filed it under (a graph's hash may match one)
            by_class[cls] = round(by_class[cls] - ms, 3)
        row["gpu_ms_by_class"] = by_class
        if len(row["top_kernels"]) + len(ann) >= 20:  # a shorter range may be left in
            row["gpu_ms_annotations_left_under_ms"] = row["top_kernels"][-1][2]
    return row


def main(out):
    bd, e2e = load(os.path.join(out, "breakdown.jsonl")), load(os.path.join(out, "e2e.jsonl"))
    e2e = [kernels_only(r) for r in e2e]
    achieved(e2e, latest_roofline())
    parity = load(os.path.join(out, "compile_parity.jsonl"))

    def ms(group_prefix, name, field="ms"):
        hits = [r[field] for r in bd if r.get("group", "").startswith(group_prefix) and r.get("name") == name
                and field in r]
        return min(hits) if hits else None

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    def first(*xs):
        xs = [x for x in xs if x]
        return min(xs) if xs else None

    def top(*xs):
        xs = [x for x in xs if x]
        return max(xs) if xs else None

    ceil = next((r for r in bd if r.get("group") == "ceilings"), {})
    op, op32, blk = "op fwd+bwd bfloat16", "op fwd+bwd float32", "block fwd+bwd"
    eager = "branches_in_relu eager reference (F.instance_norm)", "branches_in_relu eager reference (channels-last IN)"
    per_call, gpu = {}, {}
    for field, out_ in (("ms", per_call), ("gpu_ms", gpu)):
        fused_in = ms(op, "branches_in_relu fused", field)
        out_["branch_in_relu_fwd_bwd_vs_eager"] = ratio(first(*(ms(op, n, field) for n in eager)), fused_in)
        out_["branch_in_relu_fwd_bwd_vs_compile"] = ratio(ms(op, "branches_in_relu torch.compile(reference)", field),
                                                          fused_in)
        out_["branch_in_relu_fwd_bwd_fp32_vs_eager"] = ratio(first(*(ms(op32, n, field) for n in eager)),
                                                             ms(op32, "branches_in_relu fused", field))
        out_["dmfb_fwd_bwd_vs_eager"] = ratio(ms(blk, "DMFB reference", field), ms(blk, "DMFB fused", field))
        out_["dmfb_fwd_bwd_vs_compile"] = ratio(ms(blk, "DMFB torch.compile(reference)", field),
                                                ms(blk, "DMFB fused", field))
        # the opt-in kernels against what they replace (gpu_adopt.py decides from the same rows)
        thin = "G input conv bfloat16"
        for label, key in (("fwd, batch 64", "fwd_b64"), ("fwd+bwd, batch 16", "fwd_bwd_b16")):
            out_[f"g_input_conv_{key}_thin_kernel_vs_cudnn"] = ratio(ms(thin, f"{label}: cuDNN, bias, ReLU", field),
                                                                     ms(thin, f"{label}: thin conv kernel", field))
        out_["d_input_conv_fwd_bwd_b16_thin_kernel_vs_cudnn"] = ratio(
            ms("D input conv bfloat16", "D fwd+bwd, batch 16: cuDNN", field),
            ms("D input conv bfloat16", "D fwd+bwd, batch 16: thin conv kernel", field))
        out_["max_pool_fwd_bwd_kernels_vs_aten"] = ratio(ms("max pool 2x2 fwd+bwd bfloat16", "ATen max_pool2d", field),
                                                         ms("max pool 2x2 fwd+bwd bfloat16", "max-pool kernels", field))
        vgg = "VGG19 fwd+bwd bfloat16"
        out_["vgg_fwd_bwd_max_pool_kernels_vs_plain"] = ratio(ms(vgg, "ATen bias add, ReLU", field),
                                                              ms(vgg, "max-pool kernels", field))
        l1 = "L1 loss terms fwd+bwd bfloat16"
        out_["l1_loss_terms_fwd_bwd_kernels_vs_aten"] = ratio(ms(l1, "ATen (the loss's formula)", field),
                                                              ms(l1, "L1 kernels", field))

    def e(case, variant, field="ms"):
        hits = [r.get(field) for r in e2e if r.get("case", "").startswith(case) and r.get("variant") == variant]
        return hits[0] if hits else None

    def cen(dt, field="ms"):
        g = f"centroid fwd+bwd {dt} channels_last"
        return ratio(ms(g, "torch formula", field), ms(g, "extension", field))

    def cen_read_share(dt, gpu_ms=None):
        """The issue's bandwidth target: the time to read the op's inputs (the two maps) at the measured copy
        bandwidth, as a share of the op's forward+backward GPU time (target >= 0.5); gpu_ms: that time, if not
        the default plan's."""
        g = f"centroid fwd+bwd {dt} channels_last"
        gpu_ms = gpu_ms or ms(g, "extension", "gpu_ms")
        nbytes, copy = ms(g, "extension", "bytes"), ceil.get("copy_tbs")
        if not (gpu_ms and nbytes and copy):
            return None
        inputs = 2 * nbytes / 3  # bytes counts both maps and the gradient (gpu_breakdown.py)
        return round(inputs / (copy * 1e12) / (gpu_ms * 1e-3), 3)

    def cen_read_share_bound(dt):
        """The share the op could reach with the launches it makes: every byte at copy bandwidth, plus the
        smallest kernel's GPU time for each of its kernels (autograd's seed fill included), which is spent
        before or after any byte moves. Above the target, the target is within the card; below, this is the
        measured argument that it is not, with these launches."""
        g = f"centroid fwd+bwd {dt} channels_last"
        hits = [r for r in bd if r.get("group", "").startswith(g) and r.get("name") == "extension"]
        nbytes, copy, tiny = ms(g, "extension", "bytes"), ceil.get("copy_tbs"), ceil.get("tiny_kernel_us")
        kernels = len(hits[0].get("gpu_us_by_kernel") or {}) if hits else 0
        if not (nbytes and copy and tiny and kernels):
            return None
        floor_s = nbytes / (copy * 1e12) + kernels * tiny * 1e-6
        return round((2 * nbytes / 3) / (copy * 1e12) / floor_s, 3)

    def cen_aten_floor(dt, readers=("read both maps' bytes (torch.sum)",), writers=("write one map's bytes (fill_)",)):
        """The read share at ATen's measured floor: both maps read by one ATen sum, one map written by one
        fill, and the smallest kernel (autograd's seed), each timed at the op's size on this card. Below 0.5,
        the target asks more than ATen's own streaming kernels reach here: the measured argument that it is
        beyond the card at this size; above, what the extension's kernels could still gain. readers, writers:
        the rows to take the fastest of (cen_best_floor adds the Triton streaming reads and writes)."""
        fg = f"centroid floor {dt}"
        reads = [(ms(fg, r, "gpu_ms"), ms(fg, r, "bytes")) for r in readers]
        read, nbytes = min(((t, b) for t, b in reads if t and b), default=(None, None))
        write = min((t for t in (ms(fg, w, "gpu_ms") for w in writers) if t), default=None)
        copy, tiny = ceil.get("copy_tbs"), ceil.get("tiny_kernel_us")
        if not (read and write and nbytes and copy and tiny):
            return None
        return round(nbytes / (copy * 1e12) / ((read + write) * 1e-3 + tiny * 1e-6), 3)

    def cen_best_floor(dt):
        """cen_aten_floor with the fastest reader and writer the breakdown timed: ATen's sum and fill_, or a
        Triton streaming read or write (a kernel with nothing else to do). What the best kernels measured
        reach for the op's least traffic."""
        fg = f"centroid floor {dt}"
        names = {r["name"] for r in bd if r.get("group", "").startswith(fg)}
        readers = tuple(sorted(n for n in names if n.startswith("read both maps' bytes")))
        writers = tuple(sorted(n for n in names if n.startswith("write one map's bytes")))
        return cen_aten_floor(dt, readers, writers) if readers and writers else None

    def cen_best_plan_share(dt, op_kernels=False):
        """cen_read_share for the fastest plan of the forward (the default's candidate, cen_plans). op_kernels:
        without autograd's seed (the FillFunctor kernel that writes the loss's ones before backward: not a
        kernel of the op, and in training one seed serves the whole loss), the op's own kernels alone."""
        g = f"centroid fwd+bwd {dt} channels_last"
        rows = [r for r in bd if r.get("group", "").startswith(g) and r.get("name", "").startswith("extension")
                and r.get("gpu_ms")]
        if not rows:
            return None
        best = min(rows, key=lambda r: r["gpu_ms"])
        gpu_ms = best["gpu_ms"]
        if op_kernels:
            kernels = best.get("gpu_us_by_kernel")
            if not kernels:
                return None
            gpu_ms -= sum(us for name, us in kernels.items() if "FillFunctor" in name) / 1e3
        return cen_read_share(dt, gpu_ms)

    def cen_plans():
        """{dtype: {plan: GPU us}} of the extension's channels-last rows (its A/B plans, gpu_breakdown.py), with
        the fastest plan's name (a plan 3% faster than the default is the candidate for that dtype's default,
        which a session sets in csrc/centroid_align_cuda.cpp after the CUDA tests pass)."""
        plans = {}
        for dt in ("bfloat16", "float32"):
            g = f"centroid fwd+bwd {dt} channels_last"
            names = {r["name"] for r in bd if r.get("group", "").startswith(g)
                     and r.get("name", "").startswith("extension")}
            rows = {n: round(ms(g, n, "gpu_ms") * 1e3, 2) for n in sorted(names) if ms(g, n, "gpu_ms")}
            if rows:  # ms: a rerun's fastest; a failed row has no gpu_ms
                plans[dt] = dict(rows, fastest=min(rows, key=rows.get))
        return plans

    def cen_adopt():
        """{dtype: the plan to make its default, or None to keep it}: docs/testing.md's rule, the fastest
        channels-last plan in GPU time where it beats the default's row ("extension") by 3%, and the
        MEASURED_PLANS entry (dmfn_fast/ops/centroid_align.py) that makes it the default on this card's compute
        capability (a forward plan, Triton or C++; a backward plan's default is grad_options' in
        csrc/centroid_align_cuda.cpp). Adopt only where tests-centroid passed on the card (stages.txt here)."""
        stages_txt = os.path.join(out, "stages.txt")
        stages = open(stages_txt).read() if os.path.exists(stages_txt) else ""
        tests = ("passed" if "tests-centroid: rc=0" in stages else
                 "not run or failed: adopt nothing" if stages else "unknown (no stages.txt)")
        plans = {}
        for dt, times in cen_plans().items():  # each plan's fastest GPU us (a rerun's rows join a call's)
            best, base = times["fastest"], times.get("extension")
            if base is None:
                continue
            if best == "extension" or times[best] > 0.97 * base:
                plans[dt] = None
                continue
            g = f"centroid fwd+bwd {dt} channels_last"
            row = next((r for r in bd if r.get("group", "").startswith(g) and r.get("name") == best
                        and "switches" in r), {})
            sw, major = row.get("switches"), (row.get("capability") or [None])[0]
            key = f"MEASURED_PLANS[({major}, torch.{dt})]"
            where = ("its switches: gpu_breakdown.py's plan list (a row from before the rows recorded them)"
                     if sw is None else
                     "a backward plan: its default in csrc/centroid_align_cuda.cpp's grad_options"
                     if set(sw) & set(BACKWARD_PLAN_SWITCHES) else
                     f"del {key}" if sw == {"DMFN_CENTROID_TRITON": "0"} else f"{key} = {sw}")
            plans[dt] = dict(plan=best, switches=sw, gpu_us=times[best], default_gpu_us=base,
                             faster_pct=round(100 * (1 - times[best] / base), 1), set=where, tests_centroid=tests)
        return plans

    ratios = {
        **per_call,
        "generator_fwd_bwd_fast_vs_amp_compile": ratio(e("generator", "amp+compile"), e("generator", "fast")),
        "generator_fwd_bwd_fast_vs_amp": ratio(e("generator", "amp"), e("generator", "fast")),
        "train_step_fast_vs_amp": ratio(e("train step", "amp"), e("train step", "fast")),
        "train_step_fast_vs_amp_compile": ratio(e("train step", "amp+compile"), e("train step", "fast")),
        "train_step_fast_vs_baseline": ratio(e("train step", "baseline"), e("train step", "fast")),
        "train_step_fast_compile_vs_amp_compile": ratio(e("train step", "amp+compile"), e("train step", "fast+compile")),
        "generator_fwd_bwd_fast_compile_vs_amp_compile": ratio(e("generator", "amp+compile"),
                                                               e("generator", "fast+compile")),
        "train_step_fast_compile_traced_vs_amp_compile": ratio(e("train step", "amp+compile"),
                                                               e("train step", "fast+compile (traced)")),
        "generator_fwd_bwd_fast_compile_traced_vs_amp_compile": ratio(e("generator", "amp+compile"),
                                                                      e("generator", "fast+compile (traced)")),
        "generator_fwd_bwd_fast_compile_ro_traced_vs_amp_compile": ratio(
            e("generator", "amp+compile"), e("generator", "fast+compile-ro (traced)")),
        # DMFN_COMPILED_NORMS: the encoder's and decoder's norms under compile, ours (default) vs Inductor's
        "generator_fwd_bwd_compile_ro_fused_norms_vs_inductor_norms": ratio(
            e("generator", "fast+compile-ro (traced), Inductor norms"), e("generator", "fast+compile-ro (traced)")),
        # the generator target against its strongest baseline: the faster compiled reference, either mode
        "generator_fwd_bwd_best_fast_vs_best_amp_compile": ratio(
            first(e("generator", "amp+compile"), e("generator", "amp+compile-ro")),
            first(*(e("generator", v) for v in BEST_FAST))),
        "generator_fwd_bwd_fast_graphs_vs_amp_compile": ratio(e("generator", "amp+compile"),
                                                              e("generator", "fast+graphs")),
        "generator_fwd_bwd_fast_graphs_vs_amp_graphs": ratio(e("generator", "amp+graphs"),
                                                             e("generator", "fast+graphs")),
        # every module of the step compiled (train.py --compile): -ro replays CUDA graphs, for both sides
        "train_step_fast_compile_ro_traced_vs_amp_compile_ro": ratio(
            e("train step", "amp+compile-ro"), e("train step", "fast+compile-ro (traced)")),
        # the fastest default fast configuration against the strongest compiled reference, and against amp
        "train_step_best_fast_vs_best_amp_compile": ratio(
            first(e("train step", "amp+compile"), e("train step", "amp+compile-ro")),
            first(*(e("train step", v) for v in BEST_FAST))),
        "train_step_best_fast_vs_amp": ratio(e("train step", "amp"),
                                             first(*(e("train step", v) for v in BEST_FAST))),
        "train_step_mfu": e("train step", "fast", "mfu_pct"),
        # the uncompiled step as one CUDA graph (train.py --cuda-graphs), against eager amp and amp graphed alike
        "train_step_fast_graphs_vs_amp": ratio(e("train step", "amp"), e("train step", "fast+graphs")),
        "train_step_fast_graphs_vs_amp_graphs": ratio(e("train step", "amp+graphs"), e("train step", "fast+graphs")),
        "train_step_fast_vs_fast_no_recompute": ratio(e("train step", "fast (no recompute)"), e("train step", "fast")),
        "train_step_fast_compile_ro_traced_vs_amp_compile": ratio(
            e("train step", "amp+compile"), e("train step", "fast+compile-ro (traced)")),
        # > 1: the step's finite-flag reads (one wait for the GPU, all of the step's work queued) cost that much
        "train_step_fast_vs_no_flag_reads": ratio(e("train step", "fast"), e("train step", "fast (no flag reads)")),
        "train_step_fast_compile_traced_vs_no_flag_reads": ratio(
            e("train step", "fast+compile (traced)"), e("train step", "fast+compile (traced) (no flag reads)")),
        "train_step_peak_mem_fast_vs_amp": ratio(e("train step", "fast", "peak_mem_mib"),
                                                 e("train step", "amp", "peak_mem_mib")),
        "centroid_fwd_bwd_vs_torch_bf16": cen("bfloat16"),
        "centroid_fwd_bwd_vs_torch_fp32": cen("float32"),
        "centroid_input_read_share_bf16": cen_read_share("bfloat16"),
        "centroid_input_read_share_fp32": cen_read_share("float32"),
        "centroid_read_share_bound_bf16": cen_read_share_bound("bfloat16"),
        "centroid_read_share_bound_fp32": cen_read_share_bound("float32"),
        "centroid_input_read_share_best_plan_bf16": cen_best_plan_share("bfloat16"),
        "centroid_input_read_share_best_plan_fp32": cen_best_plan_share("float32"),
        "centroid_input_read_share_best_plan_op_kernels_bf16": cen_best_plan_share("bfloat16", op_kernels=True),
        "centroid_input_read_share_best_plan_op_kernels_fp32": cen_best_plan_share("float32", op_kernels=True),
        "centroid_read_share_aten_floor_bf16": cen_aten_floor("bfloat16"),
        "centroid_read_share_aten_floor_fp32": cen_aten_floor("float32"),
        "centroid_read_share_best_floor_bf16": cen_best_floor("bfloat16"),
        "centroid_read_share_best_floor_fp32": cen_best_floor("float32"),
        "inference_img_s_256_b64_bf16": e("inference", "fast", "images_per_s"),
        "inference_img_s_256_b64_bf16_amp_compile": e("inference", "amp+compile", "images_per_s"),
        "inference_img_s_256_b64_bf16_fast_compile": e("inference", "fast+compile", "images_per_s"),
        "inference_img_s_256_b64_bf16_fast_graphs": e("inference", "fast+graphs", "images_per_s"),
        # the inference target at the fastest default fast configuration, and the compiled reference's best
        "inference_img_s_256_b64_bf16_best_fast": top(*(e("inference", v, "images_per_s") for v in BEST_FAST)),
        "inference_img_s_256_b64_bf16_best_amp_compile": top(e("inference", "amp+compile", "images_per_s"),
                                                             e("inference", "amp+compile-ro", "images_per_s")),
    }
    # the end-to-end targets in GPU time too (what they would be with no host cost)
    best_fast_gpu = first(*(e("train step", v, "gpu_ms") for v in BEST_FAST))
    gpu.update({
        "generator_fwd_bwd_fast_compile_traced_vs_amp_compile": ratio(
            e("generator", "amp+compile", "gpu_ms"), e("generator", "fast+compile (traced)", "gpu_ms")),
        "train_step_fast_vs_amp": ratio(e("train step", "amp", "gpu_ms"), e("train step", "fast", "gpu_ms")),
        "train_step_best_fast_vs_best_amp_compile": ratio(
            first(e("train step", "amp+compile", "gpu_ms"), e("train step", "amp+compile-ro", "gpu_ms")),
            best_fast_gpu),
        "train_step_best_fast_vs_baseline": ratio(e("train step", "baseline", "gpu_ms"), best_fast_gpu),
        "generator_fwd_bwd_best_fast_vs_best_amp_compile": ratio(
            first(e("generator", "amp+compile", "gpu_ms"), e("generator", "amp+compile-ro", "gpu_ms")),
            first(*(e("generator", v, "gpu_ms") for v in BEST_FAST))),
        # the centroid target is stated in GPU time
        "centroid_fwd_bwd_vs_torch_bf16": cen("bfloat16", "gpu_ms"),
        "centroid_fwd_bwd_vs_torch_fp32": cen("float32", "gpu_ms"),
    })
    devices = {r.get("device") for r in bd + e2e if r.get("device")}
    env = open(os.path.join(out, "env.txt")).read() if os.path.exists(os.path.join(out, "env.txt")) else ""
    # the opt-in kernels the fast rows ran with (gpu_check.sh takes those its breakdown measured faster)
    opt_in = sorted({k for r in e2e for k in r.get("opt_in", [])})
    summary = dict(card=sorted(devices), date=datetime.date.today().isoformat(), env=env.strip(), opt_in=opt_in,
                   ceilings={k: ceil.get(k) for k in ("copy_tbs", "bf16_tflops", "tiny_kernel_us")}, ratios=ratios,
                   ratios_gpu_time=gpu, centroid_plans_gpu_us=cen_plans(), centroid_plan_to_adopt=cen_adopt(),
                   compiled_step_first_terms_rel_diff=step_parity(e2e),
                   breakdown=bd, e2e=e2e, compile_parity=parity)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

    lines = [f"card: {', '.join(sorted(devices)) or 'none'}; ceilings measured: {summary['ceilings']}; "
             f"opt-in kernels in the fast rows: {', '.join(opt_in) or 'none'}", "",
             "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in ratios.items()]
    lines += ["", "Same ratios in GPU time (kernels only, torch.profiler):", "", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in gpu.items()]
    lines += ["", "Centroid op fwd+bwd, channels-last, GPU us per plan of the extension's forward:", ""]
    lines += [f"- {dt}: {plans}" for dt, plans in summary["centroid_plans_gpu_us"].items()]
    lines += ["", "The plan to make the default (3% faster than the default's row in GPU time; None: keep it):", ""]
    lines += [f"- {dt}: {plan}" for dt, plan in summary["centroid_plan_to_adopt"].items()]
    lines += ["", "Compiled training steps: largest relative difference of the first step's loss terms from eager:",
              "", "| variant | max rel diff |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary["compiled_step_first_terms_rel_diff"].items()]
    lines += ["", "ms: do_bench median per call (host-bound when launches cannot keep ahead); GPU ms: the kernels' "
              "own time per call (torch.profiler); rates use GPU ms where measured.", "",
              "| group | name | ms | GPU ms | TFLOP/s | % bf16 peak | TB/s | % copy BW |",
              "|---|---|---|---|---|---|---|---|"]

    def f(r, k, fmt):
        return fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else ""
    for r in bd:
        if r.get("group") == "ceilings":
            continue
        cell = f(r, "ms", "{:.4f}") or ("result: " + str(r["result"]) if "result" in r else
                                         "ERROR: " + r.get("error", "")[:80])
        lines.append(f"| {r['group']} | {r['name']} | {cell} | {f(r, 'gpu_ms', '{:.4f}')} | {f(r, 'tflops', '{:.1f}')} | "
                     f"{f(r, 'pct_bf16_peak', '{:.0f}')} | {f(r, 'tbs', '{:.2f}')} | {f(r, 'pct_copy_bw', '{:.0f}')} |")
    lines += ["", "| case | variant | ms | GPU ms | images/s | TFLOP/s | MFU % | peak MiB | GPU ms by kernel class, rates reached |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in e2e:
        cell = f(r, "ms", "{:.3f}") or "ERROR: " + r.get("error", "")[:80]
        lines.append(f"| {r['case']} | {r['variant']} | {cell} | {f(r, 'gpu_ms', '{:.3f}')} | "
                     f"{f(r, 'images_per_s', '{:.0f}')} | {f(r, 'tflops', '{:.1f}')} | {f(r, 'mfu_pct', '{:.1f}')} | "
                     f"{f(r, 'peak_mem_mib', '{:.0f}')} | {r.get('gpu_ms_by_class', '')} {r.get('achieved', '')}"
                     f"{' host ms ' + str(r['host_ms_by_region']) if r.get('host_ms_by_region') else ''}"
                     f"{' GPU ms ' + str(r['gpu_ms_by_region']) if r.get('gpu_ms_by_region') else ''} |")
    for r in e2e:  # the longest kernels of each variant timed with its GPU-time split
        if r.get("top_kernels"):
            lines += ["", f"Longest kernels, {r['case']}, {r['variant']} (ms per step):", "",
                      "| ms | class | kernel |", "|---|---|---|"]
            lines += [f"| {t} | {c} | `{n}` |" for n, c, t in r["top_kernels"]]
        if r.get("top_ops"):
            lines += ["", f"ATen ops whose own kernels took the most, {r['case']}, {r['variant']} (ms per step):", "",
                      "| ms | op | input shapes |", "|---|---|---|"]
            lines += [f"| {t} | `{op}` | `{shapes}` |" for op, shapes, t in r["top_ops"]]
    lines += ["", "torch.compile of the fused ops: relative L2 error of [output, input gradients...]", "",
              "| precision | case | eager vs float64 | compiled vs float64 | compiled vs eager |", "|---|---|---|---|---|"]
    for r in parity:
        mode = r["mode"] + (" (traced)" if r.get("triton_op") else "")
        if "error" in r:
            lines.append(f"| {mode} | {r['case']} | ERROR: {r['error'][:80]} | | |")
        else:
            lines.append(f"| {mode} | {r['case']} | {r['eager_vs_f64']} | {r['compiled_vs_f64']} | "
                         f"{r['compiled_vs_eager']} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    folder = sys.argv[1] if len(sys.argv) > 1 else "out"
    if len(sys.argv) > 2 or not os.path.isdir(folder):
        sys.exit("usage: python benchmarks/gpu_summary.py OUT_DIR (a folder of gpu_check.sh's .jsonl files, "
                 f"where summary.json and summary.md are written); {folder!r} is not a folder")
    main(folder)
