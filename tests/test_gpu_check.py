"""The staged GPU check cannot rot between GPU leases: its --dry mode runs every stage on the CPU (tiny
sizes, kernels interpreted) and must write the same files, with every ratio key issue targets use."""
import json
import re
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ["branch_in_relu_fwd_bwd_vs_eager", "branch_in_relu_fwd_bwd_vs_compile", "dmfb_fwd_bwd_vs_eager",
        "generator_fwd_bwd_fast_vs_amp_compile", "train_step_fast_vs_amp", "train_step_fast_vs_amp_compile",
        "train_step_fast_vs_baseline", "train_step_mfu", "centroid_fwd_bwd_vs_torch_bf16",
        "centroid_fwd_bwd_vs_torch_fp32", "inference_img_s_256_b64_bf16", "train_step_best_fast_vs_best_amp_compile",
        "train_step_best_fast_vs_amp", "generator_fwd_bwd_best_fast_vs_best_amp_compile",
        "inference_img_s_256_b64_bf16_best_fast", "centroid_input_read_share_bf16", "centroid_input_read_share_fp32",
        "centroid_read_share_bound_bf16", "centroid_read_share_bound_fp32", "centroid_read_share_aten_floor_bf16",
        "centroid_read_share_aten_floor_fp32"]


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=900)
    log = (tmp_path / "log.txt").read_text() if (tmp_path / "log.txt").exists() else ""
    assert p.returncode == 0, p.stdout[-3000:] + log[-5000:]
    files = sorted(os.listdir(tmp_path))
    assert len(files) <= 8, files  # what the GPU tool brings back
    for name in ("env.txt", "stages.txt", "log.txt", "compile_parity.jsonl", "breakdown.jsonl", "e2e.jsonl",
                 "summary.json", "summary.md"):
        assert name in files, files
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(KEYS) <= set(summary["ratios"]), sorted(summary["ratios"])
    rows = summary["breakdown"] + summary["e2e"] + summary["compile_parity"]
    assert rows and not [r for r in rows if "error" in r], [r for r in rows if "error" in r]
    # Every stage ran and passed.
    stages = (tmp_path / "stages.txt").read_text()
    for stage in ("tests-dmfb", "tests-centroid", "tests-recipe", "train-smoke", "compile-parity", "breakdown", "e2e",
                  "ncu-case", "ncu-centroid-case", "sanitizer-case"):
        assert f"{stage}: rc=0" in stages, stages


def test_gpu_check_refuses_an_unknown_stage_to_skip(tmp_path):
    """A misspelt GPU_CHECK_SKIP name (it would run a stage a lease has no time for) or breakdown switch (the
    breakdown stage would fail) is refused before any work; the script's list of names is exactly the stages
    it runs."""
    script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_SKIP="tests-dmfb  tests-centriod")
    p = subprocess.run(["bash", script, "--dry", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "no stage 'tests-centriod'" in p.stderr, (p.returncode, p.stderr)
    assert not (tmp_path / "out").exists()
    env = dict(env, GPU_CHECK_SKIP="ncu", GPU_CHECK_BREAKDOWN_ARGS="--no-compile --centroid_only")
    p = subprocess.run(["bash", script, "--dry", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "no switch '--centroid_only'" in p.stderr, (p.returncode, p.stderr)
    assert not (tmp_path / "out").exists()
    text = open(script).read()
    listed = re.search(r'STAGES="([^"]*)"', text).group(1).split()
    code = "\n".join(re.sub(r"(^|\s)#.*", "", line) for line in text.splitlines())  # comments out
    called = re.findall(r"(?:^|\|\| |&& )\s*stage ([a-z][a-z0-9-]*)\s", code, re.M)
    assert sorted(listed) == sorted(set(called)) and len(listed) == len(set(listed)), (listed, called)


def test_breakdown_centroid_plans_are_switch_values():
    """Every A/B plan of the centroid rows (gpu_breakdown.py, CUDA only: the --dry run never sets them) names
    DMFN_CENTROID_* switches and values the op takes, and each row name once: a plan the op refused would cost a
    lease its row, and a repeated name would hide one."""
    import ast

    from dmfn_fast.ops._impl import SWITCHES

    text = open(os.path.join(ROOT, "benchmarks", "gpu_breakdown.py")).read()
    plans = [(ast.literal_eval(env), name) for env, name in re.findall(r'\((\{[^{}]*\}), "(extension[^"]*)"\)', text)]
    assert len(plans) > 15, plans
    bad = [(env, name) for env, name in plans
           if any(SWITCHES.get(f"DMFN_CENTROID_{k}", ()).count(v) != 1 for k, v in env.items())]
    assert not bad, bad
    names = [name for _, name in plans]
    assert len(set(names)) == len(names), sorted(n for n in names if names.count(n) > 1)
    assert ({"TRITON": "4"}, "extension, Triton whole planes") in plans
    assert ({"TRITON": "1", "APART": "1"}, "extension, Triton forward, maps apart") in plans


def test_e2e_failed_build_raises_its_own_error():
    """gpu_e2e.py's _built: a variant whose build fails becomes a step that raises the build's error when run
    (record() logs it as that variant's row), not a NameError of the handler's unbound `e`."""
    import ast
    import traceback
    import types

    src = open(os.path.join(ROOT, "benchmarks", "gpu_e2e.py")).read()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "_built")
    ns = dict(traceback=traceback, torch=types.SimpleNamespace(_dynamo=types.SimpleNamespace(reset=lambda: None)))
    exec(compile(ast.Module([fn], []), "gpu_e2e.py", "exec"), ns)

    def build(variant):
        raise ValueError(f"{variant}: no such card")
    with pytest.raises(ValueError, match="fast\\+compile: no such card"):
        ns["_built"](build, "fast+compile")()


def test_e2e_refuses_an_unknown_variant(tmp_path):
    """gpu_e2e.py --only (GPU_CHECK_E2E_ONLY): a misspelt variant or case is refused before any work (it
    would run nothing); names as CASE:VARIANT pass the check."""
    script = os.path.join(ROOT, "benchmarks", "gpu_e2e.py")
    for only, bad in (("fast,step:amp+compile,fast+compil", "fast+compil"), ("steps:fast", "steps:fast")):
        p = subprocess.run([sys.executable, script, str(tmp_path / "out"), "--dry", "--only", only],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and f"no variant {bad!r}" in p.stderr, (p.returncode, p.stderr[-2000:])
        assert not (tmp_path / "out").exists()


def test_compiled_step_rows_are_held_to_their_eager_base():
    """summary.json's compiled_step_first_terms_rel_diff pairs each compiled training-step row with the
    eager row of the same ops (the --dry run compiles nothing, so it is checked here on rows of that form)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from gpu_summary import step_parity

    def row(variant, g, d, g2=1.0, case="train step 256px batch 16"):
        return dict(case=case, variant=variant, first_steps_terms=[{"G": g, "D": d}, {"G": g2, "D": d}])
    rows = [row("fast", 2.0, 1.0), row("amp", 4.0, 1.0), row("fast+compile (traced)", 2.0, 1.01),
            row("fast+compile-ro (traced)", 1.9, 1.0), row("amp+compile-ro", 4.0, 1.0, g2=1.2),
            row("fast+compile", 9.0, 9.0, case="generator fwd+bwd 256px batch 16"),
            dict(case="train step 256px batch 16", variant="amp+compile", first_step_terms={"G": 4.4, "D": 1.0})]
    assert step_parity(rows) == {"fast+compile (traced)": 0.01, "fast+compile-ro (traced)": 0.05,
                                 "amp+compile-ro": 0.2, "amp+compile": 0.1}


def test_adopt_takes_an_opt_in_kernel_only_where_the_breakdown_measured_it_faster():
    """gpu_check.sh runs its end-to-end stage with the opt-in kernels gpu_adopt.py picks from the breakdown:
    an opt-in must beat the default kernels it replaces by 3% in GPU time, in the bf16 rows; missing rows
    (a card without sm_90, a breakdown cut short) keep the default."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from gpu_adopt import decide

    def rows(**ms):
        return [dict(group="pieces bfloat16", name=n, gpu_ms=v) for n, v in ms.items()] + \
            [dict(group="pieces float32", name="fused wgrad kernel, 9 taps per program", gpu_ms=0.001)]
    names = {"wgrad": "fused wgrad kernel", "wgrad9": "fused wgrad kernel, 9 taps per program",
             "fwd": "fused fwd kernel", "grad": "fused grad kernel (recompute + IN/ReLU bwd + suffix)",
             "fwd_tma": "fused fwd kernel, TMA 2-D tiles", "grad_tma": "fused grad kernel, TMA 2-D tiles",
             "dgrad": "fused dgrad kernel", "dgrad_tma": "fused dgrad kernel, TMA 2-D tiles",
             "wgrad_tma": "fused wgrad kernel, TMA 2-D tiles"}

    def adopted(**ms):
        return {s for s, on, _ in decide(rows(**{names[k]: v for k, v in ms.items()})) if on}
    assert adopted(wgrad=0.120, wgrad9=0.070, fwd=0.076, grad=0.119, dgrad=0.065, fwd_tma=0.060, grad_tma=0.125,
                   dgrad_tma=0.064) == {"DMFN_WGRAD9", "DMFN_TMA"}  # TMA: 249 against 260 us together
    assert adopted(wgrad=0.120, wgrad9=0.118, fwd=0.076, grad=0.119, dgrad=0.065, fwd_tma=0.050, grad_tma=0.150,
                   dgrad_tma=0.060) == set()
    assert adopted(wgrad=0.120) == set()  # the opt-in rows missing
    # two wgrad alternatives that both win: only the faster is switched on (the TMA one would take precedence)
    assert adopted(wgrad=0.120, wgrad9=0.100, wgrad_tma=0.080) == {"DMFN_WGRAD_TMA"}
    assert adopted(wgrad=0.120, wgrad9=0.080, wgrad_tma=0.100) == {"DMFN_WGRAD9"}
    assert adopted(wgrad=0.120, wgrad9=0.118, wgrad_tma=0.080) == {"DMFN_WGRAD_TMA"}
    assert adopted(wgrad9=0.001, fwd_tma=0.001, grad_tma=0.001) == set()  # the defaults' rows missing
    def pair_adopted(group, new, old, t_new, t_old):  # an opt-in row against its default's, in one group
        return {s for s, on, _ in decide([dict(group=group, name=new, gpu_ms=t_new),
                                          dict(group=group, name=old, gpu_ms=t_old)]) if on}
    # the VGG's bias+ReLU kernel, from its own rows (another group)
    vgg = "VGG19 fwd+bwd bfloat16 [16, 3, 256, 256]"
    assert pair_adopted(vgg, "bias+ReLU kernel", "ATen bias add, ReLU", 9.0, 10.0) == {"DMFN_BIAS_ACT"}
    assert pair_adopted(vgg, "bias+ReLU kernel", "ATen bias add, ReLU", 9.8, 10.0) == set()
    # the max-pool kernels against the same plain row
    assert pair_adopted(vgg, "max-pool kernels", "ATen bias add, ReLU", 9.0, 10.0) == {"DMFN_MAX_POOL"}
    # less GPU time but slower per call (host-bound: s10's H200 VGG rows) is not adopted; per call within 3% is
    rows_s10 = [dict(group=vgg, name="bias+ReLU kernel", gpu_ms=6.13, ms=10.84),
                dict(group=vgg, name="ATen bias add, ReLU", gpu_ms=7.53, ms=8.08)]
    assert not dict((s, on) for s, on, _ in decide(rows_s10))["DMFN_BIAS_ACT"]
    assert dict((s, on) for s, on, _ in decide(rows_s10, per_call=False))["DMFN_BIAS_ACT"]  # GPU-bound rows
    rows_s10[0]["ms"] = 8.3
    assert dict((s, on) for s, on, _ in decide(rows_s10))["DMFN_BIAS_ACT"]
    # the thin-input convolution, from its forward (inference) and fwd+bwd (training) rows together
    thin = "G input conv bfloat16"

    def thin_adopted(fwd, train, plain_fwd=1.3, plain_train=1.0, d=0.1, plain_d=0.3):
        rows = [dict(group=thin, name=f"{label}: {kind}", gpu_ms=t)
                for label, kind, t in (("fwd, batch 64", "thin conv kernel", fwd),
                                       ("fwd+bwd, batch 16", "thin conv kernel", train),
                                       ("fwd, batch 64", "cuDNN, bias, ReLU", plain_fwd),
                                       ("fwd+bwd, batch 16", "cuDNN, bias, ReLU", plain_train))]
        rows += [dict(group="D input conv bfloat16", name=f"D fwd+bwd, batch 16: {kind}", gpu_ms=t)
                 for kind, t in (("thin conv kernel", d), ("cuDNN", plain_d))]
        return {s for s, on, _ in decide(rows) if on}
    assert thin_adopted(0.3, 0.4) == {"DMFN_THIN_CONV"}
    assert thin_adopted(1.3, 0.99, d=0.3) == set()  # 0.4% faster in sum: within the noise
    assert thin_adopted(1.3, 1.0, d=0.1) == {"DMFN_THIN_CONV"}  # the discriminator's rows count too
    assert thin_adopted(0.3, None) == set()  # a row missing (its kernel failed)
    assert thin_adopted(0.3, 0.4, d=None) == set()
    # the loss's L1 kernels, from their own rows
    l1 = "L1 loss terms fwd+bwd bfloat16 (VGG features of 16 x 256 px)"
    assert pair_adopted(l1, "L1 kernels", "ATen (the loss's formula)", 0.4, 1.6) == {"DMFN_L1_KERNEL"}
    assert pair_adopted(l1, "L1 kernels", "ATen (the loss's formula)", 1.58, 1.6) == set()


def test_summary_ratios_of_the_opt_in_kernels(tmp_path):
    """The summary's ratios for the thin-input convolution, the max-pool and the L1 loss kernels, from their
    breakdown rows (per call and GPU time); a missing row gives None."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_summary

    thin, vgg = "G input conv bfloat16", "VGG19 fwd+bwd bfloat16 [16, 3, 256, 256]"
    rows = [dict(group=thin, name="fwd, batch 64: cuDNN, bias, ReLU", ms=2.0, gpu_ms=1.9),
            dict(group=thin, name="fwd, batch 64: thin conv kernel", ms=0.5, gpu_ms=0.25),
            dict(group=thin, name="fwd+bwd, batch 16: cuDNN, bias, ReLU", ms=1.0, gpu_ms=0.9),
            dict(group=vgg, name="ATen bias add, ReLU", ms=8.0, gpu_ms=7.5),
            dict(group=vgg, name="max-pool kernels", ms=8.0, gpu_ms=7.0),
            dict(group="max pool 2x2 fwd+bwd bfloat16 [16, 64, 256, 256]", name="ATen max_pool2d", ms=0.4, gpu_ms=0.3),
            dict(group="max pool 2x2 fwd+bwd bfloat16 [16, 64, 256, 256]", name="max-pool kernels", ms=0.2,
                 gpu_ms=0.15),
            dict(group="L1 loss terms fwd+bwd bfloat16 (VGG features of 16 x 256 px)",
                 name="ATen (the loss's formula)", ms=2.0, gpu_ms=1.6),
            dict(group="L1 loss terms fwd+bwd bfloat16 (VGG features of 16 x 256 px)", name="L1 kernels", ms=0.5,
                 gpu_ms=0.4),
            dict(group="D input conv bfloat16", name="D fwd+bwd, batch 16: cuDNN", ms=0.6, gpu_ms=0.3),
            dict(group="D input conv bfloat16", name="D fwd+bwd, batch 16: thin conv kernel", ms=0.2, gpu_ms=0.1)]
    (tmp_path / "breakdown.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    gpu_summary.main(str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    ratios, gpu = summary["ratios"], summary["ratios_gpu_time"]
    assert ratios["g_input_conv_fwd_b64_thin_kernel_vs_cudnn"] == 4.0
    assert gpu["g_input_conv_fwd_b64_thin_kernel_vs_cudnn"] == 7.6
    assert ratios["g_input_conv_fwd_bwd_b16_thin_kernel_vs_cudnn"] is None  # the kernel's row is missing
    assert ratios["max_pool_fwd_bwd_kernels_vs_aten"] == 2.0 and gpu["max_pool_fwd_bwd_kernels_vs_aten"] == 2.0
    assert ratios["vgg_fwd_bwd_max_pool_kernels_vs_plain"] == 1.0
    assert gpu["vgg_fwd_bwd_max_pool_kernels_vs_plain"] == round(7.5 / 7.0, 3)
    assert ratios["d_input_conv_fwd_bwd_b16_thin_kernel_vs_cudnn"] == 3.0
    assert gpu["d_input_conv_fwd_bwd_b16_thin_kernel_vs_cudnn"] == 3.0
    l1 = "l1_loss_terms_fwd_bwd_kernels_vs_aten"
    assert ratios[l1] == 4.0 and gpu[l1] == 4.0


def test_centroid_input_read_share(tmp_path):
    """The centroid target's share: both maps' read time at the measured copy bandwidth over the op's GPU
    time, from the breakdown's bytes (both maps and the gradient) and its fastest GPU time."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_summary

    g = "centroid fwd+bwd bfloat16 channels_last [16, 512, 32, 32]"
    launches = {"fill": 1.5, "pair_sums_vec": 10.0, "finish_pairs": 3.0, "grad_channels_vec": 5.0}
    rows = [dict(group="ceilings", name="measured", copy_tbs=4.0, tiny_kernel_us=2.0),
            dict(group=g, name="extension", ms=0.2, gpu_ms=0.040, bytes=3 * 2 ** 24, gpu_us_by_kernel=launches),
            dict(group=g, name="extension", ms=0.1, gpu_ms=0.036, bytes=3 * 2 ** 24, gpu_us_by_kernel=launches),
            dict(group=g, name="extension, finish in blocks", ms=0.1, gpu_ms=0.0331, bytes=3 * 2 ** 24,
                 gpu_us_by_kernel={"void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>":
                                   1.5, "pair_sums_vec": 25.0, "sum_shares": 1.6, "grad_channels_vec": 5.0}),
            dict(group=g, name="extension, two waves", error="RuntimeError: ..."),
            dict(group="centroid floor bfloat16 [16, 512, 32, 32]", name="read both maps' bytes (torch.sum)",
                 gpu_ms=0.010, bytes=2 * 2 ** 24),
            dict(group="centroid floor bfloat16 [16, 512, 32, 32]", name="write one map's bytes (fill_)",
                 gpu_ms=0.005, bytes=2 ** 24),
            dict(group="centroid floor bfloat16 [16, 512, 32, 32]",
                 name="read both maps' bytes (Triton, 8192 a program, 8 warps)", gpu_ms=0.008, bytes=2 * 2 ** 24),
            dict(group="centroid floor bfloat16 [16, 512, 32, 32]",
                 name="read both maps' bytes (Triton, 4096 a program, 4 warps)", gpu_ms=0.012, bytes=2 * 2 ** 24),
            dict(group="centroid floor bfloat16 [16, 512, 32, 32]",
                 name="read both maps' bytes (Triton, 16384 a program, 8 warps)", error="its sum ..."),
            dict(group="centroid floor bfloat16 [16, 512, 32, 32]",
                 name="write one map's bytes (Triton, 8192 a program, 8 warps)", gpu_ms=0.004, bytes=2 ** 24)]
    (tmp_path / "breakdown.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    gpu_summary.main(str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    ratios = summary["ratios"]
    assert ratios["centroid_input_read_share_bf16"] == round(2 * 2 ** 24 / 4e12 / 36e-6, 3)
    assert ratios["centroid_input_read_share_fp32"] is None
    # the bound: every byte at copy bandwidth plus the smallest kernel's time for each of the 4 launches
    assert ratios["centroid_read_share_bound_bf16"] == round((2 * 2 ** 24 / 4e12) / (3 * 2 ** 24 / 4e12 + 4 * 2e-6), 3)
    assert ratios["centroid_read_share_bound_fp32"] is None
    # at ATen's floor: both maps read by one sum, one written by one fill, and the seed's smallest kernel
    assert ratios["centroid_read_share_aten_floor_bf16"] == round((2 * 2 ** 24 / 4e12) / (15e-6 + 2e-6), 3)
    assert ratios["centroid_read_share_aten_floor_fp32"] is None
    # the same with the fastest reader and writer timed (Triton's here; a failed row left out)
    assert ratios["centroid_read_share_best_floor_bf16"] == round((2 * 2 ** 24 / 4e12) / (12e-6 + 2e-6), 3)
    assert ratios["centroid_read_share_best_floor_fp32"] is None
    assert summary["ceilings"]["tiny_kernel_us"] == 2.0
    # the fastest plan's share, and its share without autograd's seed fill (not a kernel of the op)
    assert ratios["centroid_input_read_share_best_plan_bf16"] == round(2 * 2 ** 24 / 4e12 / 33.1e-6, 3)
    assert ratios["centroid_input_read_share_best_plan_op_kernels_bf16"] == round(2 * 2 ** 24 / 4e12 / 31.6e-6, 3)
    # each plan of the forward with its GPU time (a failed row left out), and the fastest: the A/B's answer
    assert summary["centroid_plans_gpu_us"] == {"bfloat16": {"extension": 36.0, "extension, finish in blocks": 33.1,
                                                             "fastest": "extension, finish in blocks"}}


def test_centroid_plan_to_adopt(tmp_path):
    """The adoption rule for the centroid op's default plan: per dtype, the fastest plan in GPU time where it beats
    the default's row by 3% (a rerun's rows join the first's), as the MEASURED_PLANS entry a Triton plan takes on
    the card's capability (a Triton or a C++ forward plan), and only where this run's tests-centroid passed; a
    backward plan is named as one."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_summary
    from dmfn_fast.ops import centroid_align as ca

    def row(dt, name, gpu_ms, **switches):
        return dict(group=f"centroid fwd+bwd {dt} channels_last [16, 512, 32, 32]", name=name, ms=0.1,
                    gpu_ms=gpu_ms, bytes=3 * 2 ** 24, capability=[9, 0],
                    switches={f"DMFN_CENTROID_{k}": v for k, v in switches.items()})
    rows = [row("float32", "extension", 0.0479), row("float32", "extension", 0.0470),  # a rerun: 47.0 counts
            row("float32", "extension, Triton forward, one map a program", 0.0390, TRITON="1", ONE_MAP="1"),
            row("float32", "extension, Triton forward and backward, one map a program", 0.0380, TRITON="2",
                ONE_MAP="1"),
            row("float32", "extension, Triton forward and backward, one map a program", 0.0420, TRITON="2",
                ONE_MAP="1"),
            row("bfloat16", "extension", 0.0282),
            row("bfloat16", "extension, whole pixels", 0.0275, PIXELS="1"),  # 2.5% faster: keep the default
            dict(row("bfloat16", "extension, two waves", 0.0, WAVES="2"), gpu_ms=None, error="RuntimeError")]
    (tmp_path / "breakdown.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "stages.txt").write_text("tests-centroid: rc=0, 40 s (limit 150 s)\nbreakdown: rc=0, 25 s\n")
    gpu_summary.main(str(tmp_path))
    plans = json.loads((tmp_path / "summary.json").read_text())["centroid_plan_to_adopt"]
    sw = {"DMFN_CENTROID_TRITON": "2", "DMFN_CENTROID_ONE_MAP": "1"}
    assert plans == {"bfloat16": None, "float32": dict(
        plan="extension, Triton forward and backward, one map a program", switches=sw, gpu_us=38.0,
        default_gpu_us=47.0, faster_pct=19.1, set=f"MEASURED_PLANS[(9, torch.float32)] = {sw}",
        tests_centroid="passed")}
    assert f"- float32: {plans['float32']}" in (tmp_path / "summary.md").read_text()
    # a C++ plan 3% faster; a backward plan faster still in fp32; tests-centroid failed
    rows[6] = row("bfloat16", "extension, whole pixels", 0.0270, PIXELS="1")
    rows.append(row("float32", "extension, gradient 2 rows a block", 0.0370, GRAD_ROWS="2"))
    (tmp_path / "breakdown.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "stages.txt").write_text("tests-centroid: rc=1, 40 s (limit 150 s)\n")
    gpu_summary.main(str(tmp_path))
    plans = json.loads((tmp_path / "summary.json").read_text())["centroid_plan_to_adopt"]
    assert plans["bfloat16"]["set"] == "MEASURED_PLANS[(9, torch.bfloat16)] = {'DMFN_CENTROID_PIXELS': '1'}"
    assert plans["bfloat16"]["faster_pct"] == 4.3
    assert plans["float32"]["set"].startswith("a backward plan")
    assert plans["float32"]["tests_centroid"] == "not run or failed: adopt nothing"
    # the switches MEASURED_PLANS may not set are the backward's
    assert set(gpu_summary.BACKWARD_PLAN_SWITCHES) == (set(ca.PLAN_SWITCHES) - set(ca.TRITON_PLAN_SWITCHES)
                                                       - set(ca.CPP_PLAN_SWITCHES))


def test_top_ops_names_the_ops_that_launched_the_most_gpu_time(tmp_path):
    """The e2e rows' top_ops: host-side ops only (kernels are not ops), by their own GPU time, per call; and
    the summary prints them under the row."""
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import e2e_common
    import gpu_summary

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    ev = [SimpleNamespace(key="aten::add_", device_type=cpu, self_device_time_total=3000.0,
                          input_shapes=[[16, 256, 64, 64], [256, 1, 1]]),
          SimpleNamespace(key="elementwise_kernel", device_type=cuda, self_device_time_total=9000.0, input_shapes=[]),
          SimpleNamespace(key="aten::copy_", device_type=cpu, self_device_time_total=6000.0, input_shapes=[[2], [2]]),
          SimpleNamespace(key="aten::view", device_type=cpu, self_device_time_total=0.0, input_shapes=[[2]])]
    top = e2e_common.top_ops(ev, 5, steps=3)
    assert top == [["aten::copy_", "[[2], [2]]", 2.0], ["aten::add_", "[[16, 256, 64, 64], [256, 1, 1]]", 1.0]]
    row = dict(case="inference 256px batch 64", variant="fast", ms=1.0, top_kernels=[["k", "other", 1.0]],
               top_ops=top)
    (tmp_path / "e2e.jsonl").write_text(json.dumps(row))
    gpu_summary.main(str(tmp_path))
    md = (tmp_path / "summary.md").read_text()
    assert "| 2.0 | `aten::copy_` | `[[2], [2]]` |" in md


def test_device_kernel_times_leave_out_user_annotations():
    """The GPU time of a profiled call sums kernels only: a record_function range also shows as a device
    event spanning its kernels (with CPU activity on), which counted them twice."""
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import e2e_common

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    ev = [SimpleNamespace(key="G forward", device_type=cuda, self_device_time_total=9000.0, is_user_annotation=True),
          SimpleNamespace(key="sm90_xmma_fprop", device_type=cuda, self_device_time_total=6000.0,
                          is_user_annotation=False),
          SimpleNamespace(key="in_apply", device_type=cuda, self_device_time_total=3000.0),
          SimpleNamespace(key="aten::add_", device_type=cpu, self_device_time_total=3000.0, is_user_annotation=False)]
    assert e2e_common.device_kernel_ms(ev, steps=3) == {"sm90_xmma_fprop": 2.0, "in_apply": 1.0}


def test_summary_takes_annotations_out_of_old_rows(tmp_path):
    """Rows from before device_kernel_ms (s10's H200 run) counted train_step's record_function ranges as
    kernels: the summary takes out the ones listed among the top kernels and says when a shorter one may
    be left in; new rows (gpu_ms_kernels_only) are read as they are."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_summary

    top = [["G forward", "other", 14.0], ["sm90_xmma_fprop", "conv/matmul libraries", 2.0],
           ["## Call CompiledFxGraph abc ##", "other", 6.0]] + [[f"k{i}", "other", 0.5] for i in range(17)]
    old = dict(case="train step 256px batch 16", variant="fast", ms=60.0, gpu_ms=30.5, top_kernels=top,
               gpu_ms_by_class={"other": 28.5, "conv/matmul libraries": 2.0})
    fixed = gpu_summary.kernels_only(old)
    assert fixed["gpu_ms"] == 10.5 and fixed["gpu_ms_by_class"]["other"] == 8.5
    assert fixed["gpu_ms_annotations_removed"] == 20.0 and fixed["gpu_ms_annotations_left_under_ms"] == 0.5
    assert [k[0] for k in fixed["top_kernels"]][:2] == ["sm90_xmma_fprop", "k0"]
    assert gpu_summary.kernels_only(dict(old, gpu_ms_kernels_only=True))["gpu_ms"] == 30.5


def test_adopt_sets_each_measured_switch_both_ways(tmp_path, capsys):
    """gpu_adopt.py prints every measured switch as 0 or 1, or graphs for a kernel that won in GPU time only
    (DMFN_TMA is on by default on sm_90, so a loss must turn it off for the e2e stage); an unmeasured switch is
    left to its default."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_adopt

    ms = {"fused fwd kernel": 0.066, "fused grad kernel (recompute + IN/ReLU bwd + suffix)": 0.109,
          "fused dgrad kernel": 0.065, "fused fwd kernel, TMA 2-D tiles": 0.070,
          "fused grad kernel, TMA 2-D tiles": 0.110, "fused dgrad kernel, TMA 2-D tiles": 0.066}
    rows = [dict(group="pieces bfloat16", name=n, gpu_ms=v) for n, v in ms.items()]
    (tmp_path / "breakdown.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    gpu_adopt.main(str(tmp_path))
    assert capsys.readouterr().out.split() == ["DMFN_TMA=0"]
    # the command line: s10's VGG rows (less GPU time, more per call) keep the switch's default, graphs (the
    # kernel in CUDA-graph steps only); --gpu-time-only takes them everywhere; an unknown flag is refused
    vgg = "VGG19 fwd+bwd bfloat16 [16, 3, 256, 256]"
    rows = [dict(group=vgg, name="bias+ReLU kernel", gpu_ms=6.13, ms=10.84),
            dict(group=vgg, name="ATen bias add, ReLU", gpu_ms=7.53, ms=8.08)]
    (tmp_path / "breakdown.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    script = os.path.join(ROOT, "benchmarks", "gpu_adopt.py")
    for flags, want in (([], "DMFN_BIAS_ACT=graphs"), (["--gpu-time-only"], "DMFN_BIAS_ACT=1")):
        p = subprocess.run([sys.executable, script, str(tmp_path), *flags], capture_output=True, text=True)
        assert p.returncode == 0 and p.stdout.split() == [want], (flags, p.stdout, p.stderr)
    p = subprocess.run([sys.executable, script, str(tmp_path), "--gpu-only"], capture_output=True, text=True)
    assert p.returncode != 0 and "usage" in p.stderr
    # slower in GPU time too: never (0), not graphs; and GRAPHS names exactly the switches that take graphs
    rows[0]["gpu_ms"] = 7.6
    assert gpu_adopt.values(rows) == {"DMFN_BIAS_ACT": "0"} == gpu_adopt.values(rows, per_call=False)
    from dmfn_fast.ops import _impl
    assert set(gpu_adopt.GRAPHS) == {k for k, v in _impl.SWITCHES.items() if "graphs" in v}


_STREAMS = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from stream_kernels import column_read, pixel_read, stream_read, stream_read_pair, stream_read_strided, stream_write
torch.manual_seed(0)
for dt in (torch.float32, torch.float16):
    for shape, runs in (((2, 64, 5, 7), 1), ((3, 128, 17, 19), 3), ((1, 64, 1, 300), 4)):
        a, b = (torch.rand(shape).to(dt).contiguous(memory_format=torch.channels_last) for _ in range(2))
        want = (a.double() + b.double()).sum(dim=(2, 3)).flatten()
        torch.testing.assert_close(column_read(a, b, runs).double(), want, rtol=1e-5, atol=0)
        torch.testing.assert_close(pixel_read(a, b, runs).double(), want, rtol=1e-5, atol=0)
    x = torch.rand(5000).to(dt)
    torch.testing.assert_close(stream_read(x, 1024, 4).double().sum(), x.double().sum(), rtol=1e-5, atol=0)
    y = torch.rand(5000).to(dt)
    for shift in (0, 1, 2, 5):  # 5 blocks of 1024, the last cut short: every element of both once
        got = stream_read_pair(x, y, 1024, 4, shift).double()
        torch.testing.assert_close(got.sum(), x.double().sum() + y.double().sum(), rtol=1e-5, atol=0)
        assert got.numel() == 5
    assert bool((stream_write(torch.empty(5000, dtype=dt), 0.25, 1024, 4) == 0.25).all())
    z = torch.rand(6 * 1024 - 5).to(dt)  # 6 blocks, the last cut short: 3 runs of 2, or 6 of 1
    for streams in (1, 3, 6):  # program i reads block i % streams of every 6 // streams
        got = stream_read_strided(z, 1024, 4, streams).double()
        torch.testing.assert_close(got.sum(), z.double().sum(), rtol=1e-5, atol=0)
        per = 6 // streams
        assert got.tolist() == stream_read(z, 1024, 4).double()[[i % streams * per + i // streams
                                                                 for i in range(6)]].tolist()
try:
    stream_read_strided(torch.rand(5000), 1024, 4, 2)
except ValueError as e:
    assert "whole runs" in str(e)
else:
    sys.exit("stream_read_strided took 5 blocks in 2 streams")
try:
    stream_read_pair(torch.rand(10), torch.rand(11), 4, 1)
except ValueError as e:
    assert "one size" in str(e)
else:
    sys.exit("stream_read_pair took buffers of two sizes")
for reader, channels, why in ((column_read, 8, "whole columns"), (pixel_read, 96, "power-of-2")):
    try:
        reader(torch.rand(1, channels, 2, 2), torch.rand(1, channels, 2, 2), 1)
    except ValueError as e:
        assert why in str(e)
    else:
        sys.exit(f"{reader.__name__} took {channels} channels")
print("ok")
"""


def test_stream_kernels_read_and_write_every_element():
    """The breakdown's floor readers and writer, interpreted: the pair-order and pixel-order reads sum each
    (image, channel) over every pixel of both maps, with any number of runs, including runs past the last
    pixel; the stream read sums every element, the strided read every block once in its order of runs, and the
    paired read every element of both buffers at any shift; the write writes every element; shapes they do not
    take are refused."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _STREAMS, os.path.join(ROOT, "benchmarks")], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]


def test_pair_shifts_are_the_maps_apart_distances():
    """The floor's paired reads put map b where DMFN_CENTROID_APART's kernels read it against map a, at the
    lease's shape on 132 SMs: half a run of the Triton sums (64 KiB in fp32, 32 in bf16), half an image of the
    whole planes (1 MiB, 512 KiB), half a map (16 MiB, 8 MiB), and the same offsets; a tiny map is one block,
    so one row."""
    pytest.importorskip("triton")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from stream_kernels import pair_shifts
    from dmfn_fast.ops.centroid_align import triton_forward_plan
    shape = (16, 512, 32, 32)
    for size, half_run_kib in ((4, 64), (2, 32)):
        run = triton_forward_plan(shape, size, 132, apart=True)[4]
        assert run // 2 * 512 * size == half_run_kib * 1024
        got = pair_shifts(shape, size, run, 8192)  # blocks of 32 KiB in fp32, 16 in bf16
        assert got == {0: "at the same offsets", 2: f"half a run of the Triton sums apart, {half_run_kib} KiB",
                       32: f"half an image apart, {256 * size} KiB", 512: f"half a map apart, {4096 * size} KiB"}
    assert pair_shifts((2, 8, 5, 6), 4, 8, 8192) == {0: "at the same offsets"}
    # blocks of 256 bytes: half a run (32 bytes) still moves map b by one; half an image is 2, half a map 4;
    # two distances that round alike keep the first one's name
    assert list(pair_shifts((2, 4, 8, 8), 4, 4, 64)) == [0, 1, 2, 4]
    assert pair_shifts((2, 4, 8, 8), 4, 64, 64)[2] == "half a run of the Triton sums apart, 512 B"
