"""Compile specs of every Triton DMFB kernel, for ahead-of-time compiles without a GPU
(tests/test_dmfb_compile.py; also usable with /work/shared/tools/cubin_report.py's `report`).

compile_specs(dtype) -> [(name, jit fn, signature, constexprs, options, args divisible by 16)]:
every kernel at every autotune config, as a launch on `dtype` activations with C % 16 == 0 specializes it.
dtype "tf32": fp32 activations with TF32 dots (what fp32 runs when cuDNN's TF32 is allowed)."""


def branches_specs(dtype="bf16"):
    from dmfn_fast.kernels import dmfb_branches as kb

    lowp = dtype not in ("fp32", "tf32")
    cls = "lowp" if lowp else "f32"
    act = "*fp32" if dtype == "tf32" else "*" + dtype
    dil = dict(D1=1, D2=2, D3=4, D4=8)
    flags = dict(UPCAST=False, PREC="ieee" if dtype == "fp32" else "tf32")
    f32 = "*fp32"
    fwd_sig = dict(h_ptr=act, w_ptr=act, b_ptr=act, out_ptr=act, dt_ptr=act, mean_ptr=f32, rstd_ptr=f32,
                   sa_ptr=f32, sb_ptr=f32, N="i32", H="i32", W="i32", C="i32")
    dgrad_sig = dict(g_ptr=act, w_ptr=act, dh_ptr=act, N="i32", H="i32", W="i32", C="i32")
    wgrad_sig = dict(h_ptr=act, g_ptr=act, dw_ptr=f32, db_ptr=f32, NP="i32", H="i32", W="i32", C="i32",
                     PIX_PER_SPLIT="i32")
    wgrad_tma_sig = dict(h_ptr=act, g_ptr=act, dw_ptr=f32, db_ptr=f32, N="i32", H="i32", W="i32", C="i32")
    specs = []
    for name, fn, sig, extra, div in (
        ("fwd", kb.branches_fwd, fwd_sig, dict(MODE=0, EPI=0), ("C",)),
        ("grad", kb.branches_grad, fwd_sig, {}, ("C",)),
        ("dgrad", kb.branches_dgrad, dgrad_sig, {}, ("C",)),
        ("wgrad", kb.branches_wgrad, wgrad_sig, {}, ("C", "PIX_PER_SPLIT")),
        ("wgrad9", kb.branches_wgrad9, wgrad_sig, {}, ("C", "PIX_PER_SPLIT")),
        ("fwd_tma", kb.branches_fwd_tma, fwd_sig, dict(MODE=0, EPI=0), ("C", "W")),
        ("grad_tma", kb.branches_grad_tma, fwd_sig, {}, ("C", "W")),
        ("dgrad_tma", kb.branches_dgrad_tma, dgrad_sig, {}, ("C", "W")),
        ("wgrad_tma", kb.branches_wgrad_tma, wgrad_tma_sig, {}, ("C", "W")),
    ):
        for cfg in kb.CONFIGS.get(f"{name}_{cls}", []):  # wgrad9, *_tma: fp16/bf16 only
            cx = dict(dil, **({} if name.endswith("_tma") else flags), **extra, **cfg.kwargs)
            full = dict(sig, **{k: "constexpr" for k in cx})
            ptrs = tuple(k for k, v in sig.items() if v.startswith("*"))
            opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            specs.append((f"{name}_{cls}[{cfg}]", fn, full, cx, opts, ptrs + div))
    sig = dict(g_ptr=act, out_ptr=act, NP="i32", C="i32", BLOCK_P="constexpr", BLOCK_C="constexpr")
    specs.append(("suffix_sum", kb.suffix_sum, sig, dict(BLOCK_P=64, BLOCK_C=64), dict(num_warps=4),
                  ("g_ptr", "out_ptr", "C")))
    return specs


def instance_norm_specs(dtype="bf16"):
    from dmfn_fast.kernels import instance_norm as kn

    act, f32 = "*" + dtype, "*fp32"
    tiles = dict(BLOCK_P=kn.BLOCK_P, BLOCK_C=kn.BLOCK_C)
    opts = dict(num_warps=kn.NUM_WARPS)
    specs = [
        ("in_stats", kn.in_stats, dict(x_ptr=act, shift_ptr=f32, sum_ptr=f32, sumsq_ptr=f32, HW="i32", C="i32",
                                       PIX_PER_SPLIT="i32"), {}),
        ("in_apply", kn.in_apply, dict(x_ptr=act, res_ptr=act, y_ptr=act, shift_ptr=f32, sum_ptr=f32,
                                       sumsq_ptr=f32, mean_ptr=f32, rstd_ptr=f32, HW="i32", C="i32", eps="fp32"),
         dict(RELU=True, RESIDUAL=True)),
        ("in_bwd_reduce", kn.in_bwd_reduce, dict(dy_ptr=act, x_ptr=act, mean_ptr=f32, rstd_ptr=f32, sa_ptr=f32,
                                                 sb_ptr=f32, HW="i32", C="i32", PIX_PER_SPLIT="i32"),
         dict(RELU=True, FROM_Y=False)),
        ("in_bwd_apply", kn.in_bwd_apply, dict(dy_ptr=act, x_ptr=act, mean_ptr=f32, rstd_ptr=f32, sa_ptr=f32,
                                               sb_ptr=f32, dx_ptr=act, HW="i32", C="i32"), dict(RELU=True)),
    ]
    if dtype != "fp32":  # the elementwise kernels at 128 pixels per program too (kn.APPLY_PIXELS_2BYTE's other value)
        specs += [(f"{name}[BLOCK_P: 128]", fn, sig, dict(cx, BLOCK_P=128)) for name, fn, sig, cx in specs
                  if name in ("in_apply", "in_bwd_apply")]
    out = []
    for name, fn, sig, cx in specs:
        cx = dict(tiles, **cx)
        ptrs = tuple(k for k, v in sig.items() if v.startswith("*"))
        div = ptrs + ("C",) + (("PIX_PER_SPLIT",) if "PIX_PER_SPLIT" in sig else ())
        out.append((name, fn, dict(sig, **{k: "constexpr" for k in cx}), cx, opts, div))
    return out


def bias_act_specs(dtype="bf16"):
    """The convolutions' bias + activation kernel (ops/bias_act.py), with a bias and leaky ReLU (the longest
    form) and without a bias, ReLU."""
    from dmfn_fast.kernels import bias_act as kba

    act = "*" + dtype
    sig = dict(x_ptr=act, b_ptr=act, y_ptr=act, P="i32", C="i32", slope="fp32")
    tiles = dict(BLOCK_P=kba.BLOCK_P, BLOCK_C=kba.BLOCK_C)
    out = []
    for name, cx in (("bias_act lrelu", dict(HAS_BIAS=True, ACT=2)), ("bias_act relu no bias", dict(HAS_BIAS=False, ACT=1))):
        cx = dict(tiles, **cx)
        out.append((name, kba.bias_act, dict(sig, **{k: "constexpr" for k in cx}), cx,
                    dict(num_warps=kba.NUM_WARPS), ("x_ptr", "b_ptr", "y_ptr", "C")))
    return out


def thin_conv_specs(dtype="bf16"):
    """The thin-input convolution (ops/thin_conv.py) at every autotune config: the generator's input convolution
    (4 channels, 5x5, ReLU: the pixel gathers in 8-byte vectors), the discriminator's (3 channels run as 4,
    5x5, stride 2, no activation), and an 8-channel 3x3 stride-2 one without a bias, leaky ReLU (16-byte
    gathers, 72 of the 128 K)."""
    from dmfn_fast.kernels import thin_conv as ktc

    act = "*fp32" if dtype == "tf32" else "*" + dtype
    flags = dict(UPCAST=False, PREC="ieee" if dtype == "fp32" else "tf32")
    ints = dict(M="i32", H="i32", W="i32", OH="i32", OW="i32", O="i32", slope="fp32")
    fwd_sig = dict(x_ptr=act, w_ptr=act, b_ptr=act, y_ptr=act, **ints)
    wgrad_sig = dict(x_ptr=act, y_ptr=act, dy_ptr=act, dw_ptr="*fp32", db_ptr="*fp32", **ints, PROGRAMS="i32")
    shapes = (("generator input", dict(C=4, KH=5, KW=5, STRIDE=1, PAD=2, ACT=1, HAS_BIAS=True)),
              # 3 channels padded to 4, no activation (a batch norm follows)
              ("discriminator input", dict(C=4, KH=5, KW=5, STRIDE=2, PAD=2, ACT=0, HAS_BIAS=True)),
              ("8 channels stride 2", dict(C=8, KH=3, KW=3, STRIDE=2, PAD=1, ACT=2, HAS_BIAS=False)))
    out = []
    for label, shape in shapes:
        for name, fn, sig in (("thin_conv_fwd", ktc.thin_conv_fwd, fwd_sig),
                              ("thin_conv_wgrad", ktc.thin_conv_wgrad, wgrad_sig)):
            for cfg in ktc.CONFIGS[f"{name.split('_')[-1]}_{'lowp' if dtype in ('bf16', 'fp16') else 'f32'}"]:
                cx = dict(shape, **flags, **cfg.kwargs, BLOCK_O=64, BLOCK_K=128)
                if "wgrad" in name:
                    del cx["HAS_BIAS"]
                ptrs = tuple(k for k, v in sig.items() if v.startswith("*"))
                out.append((f"{name} {label}[{cfg}]", fn, dict(sig, **{k: "constexpr" for k in cx}), cx,
                            dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), ptrs + ("O",)))
    return out


def max_pool_specs(dtype="bf16"):
    """The index-free 2x2 max pool (ops/max_pool.py), forward and backward."""
    from dmfn_fast.kernels import max_pool as kmp

    act = "*" + dtype
    ints = dict(P="i32", H="i32", W="i32", OH="i32", OW="i32", C="i32")
    out = []
    for name, fn, ptrs in (("max_pool2x2_fwd", kmp.max_pool2x2_fwd, ("x_ptr", "y_ptr")),
                           ("max_pool2x2_bwd", kmp.max_pool2x2_bwd, ("x_ptr", "dy_ptr", "dx_ptr"))):
        cx = dict(BLOCK_P=kmp.BLOCK_P[name[-3:]], BLOCK_C=kmp.BLOCK_C)
        sig = dict({p: act for p in ptrs}, **ints, **{k: "constexpr" for k in cx})
        out.append((name, fn, sig, cx, dict(num_warps=kmp.NUM_WARPS), ptrs + ("C",)))
    return out


def l1_loss_specs(dtype="bf16"):
    """The losses' L1 kernels (ops/l1_loss.py): forward (each g layout) and backward, at the training's tiles
    (channels-last, 64 channels: 32 x 64; K = 512: 16 x 128). "bf16" also compiles fp16 (named "... fp16"):
    LLVM treats the two 16-bit types' products differently."""
    from dmfn_fast.kernels import l1_loss as kl

    out = []
    for dt in (dtype, "fp16") if dtype == "bf16" else (dtype,):
        act = "*" + dt
        ints = dict(R="i32", K="i32", C="i32")
        fwd = dict(a_ptr=act, b_ptr=act, g_ptr=act, sign_ptr="*i8", part_ptr="*fp32", **ints, ITERS="i32")
        bwd = dict(sign_ptr="*i8", g_ptr=act, scale_ptr=act, ga_ptr=act, **ints)
        for bk in (64, kl.MAX_BLOCK_K):
            tiles = dict(BLOCK_R=kl.TILE // bk, BLOCK_K=bk)
            for mode in (0, 1, 2):
                for name, fn, sig, extra in (("l1_sign_fwd", kl.l1_sign_fwd, fwd, dict(RN=True)),
                                             ("l1_sign_bwd", kl.l1_sign_bwd, bwd, {})):
                    cx = dict(G_MODE=mode, **extra, **tiles)
                    ptrs = tuple(k for k, v in sig.items() if v.startswith("*"))
                    label = f"{name} g{mode} {bk}" + (" fp16" if dt != dtype else "")
                    out.append((label, fn, dict(sig, **{k: "constexpr" for k in cx}), cx,
                                dict(num_warps=kl.NUM_WARPS), ptrs + ("K",)))
    return out


def centroid_sums_specs(dtype="bf16"):
    """The centroid loss's Triton kernels (ops/centroid_align.py, DMFN_CENTROID_TRITON): the two-map sums and the
    gradient at the training plan ([16, 512, 32, 32] on 132 SMs) and at 1032 channels (2 groups of 1024 in 16
    bits, 3 of 512 in fp32), the whole-plane sums at the training plan, the finish and the shares' sum. "bf16"
    also compiles fp16."""
    from dmfn_fast.kernels import centroid_sums as kc
    from dmfn_fast.ops import centroid_align as ca

    out = []
    for dt in (dtype, "fp16") if dtype == "bf16" else (dtype,):
        size = 4 if dt == "fp32" else 2
        for C in (512, 1032):
            cb, _, rows, steps, _, _ = ca.triton_forward_plan((16, C, 32, 32), size, 132)
            sig = dict(a="*" + dt, b="*" + dt, part="*fp32", ticket="*i32", HW="i32", W="i32", C="i32", NC="i32",
                       RUN="i32", step_u="fp32", step_v="fp32", ROWS="constexpr", STEPS="constexpr", CB="constexpr",
                       APART="constexpr", INTERLEAVE="constexpr", ONE_MAP="constexpr")
            label = f"centroid_pair_sums C{C}" + (" fp16" if dt != dtype else "")
            # DMFN_CENTROID_APART (map b half a run ahead), DMFN_CENTROID_INTERLEAVE (runs of interleaved steps) and
            # DMFN_CENTROID_ONE_MAP (a program a map)
            variants = ((False, False, False), (True, False, False), (False, True, False), (True, True, False),
                        (False, False, True), (False, True, True)) if C == 512 else ((False, False, False),)
            for apart, inter, one in variants:
                steps_ = ca.triton_forward_plan((16, C, 32, 32), size, 132, apart=apart, one_map=one)[3]
                out.append((label + " interleaved" * inter + " one map" * one + " apart" * apart, kc.centroid_pair_sums,
                            sig, dict(ROWS=rows, STEPS=steps_, CB=cb, APART=apart, INTERLEAVE=inter, ONE_MAP=one),
                            dict(num_warps=kc.WARPS), ("a", "b", "part", "C", "NC")))
            sig = dict(grad="*fp32", stats="*fp32", out="*" + dt, HW="i32", W="i32", C="i32", NC="i32", RUN="i32",
                       step_u="fp32", step_v="fp32", WHICH="i32", ROWS="constexpr", STEPS="constexpr", CB="constexpr")
            out.append((label.replace("pair_sums", "grad"), kc.centroid_grad, sig, dict(ROWS=rows, STEPS=steps, CB=cb),
                        dict(num_warps=kc.WARPS), ("stats", "out", "C", "NC")))
        sig = dict(a="*" + dt, b="*" + dt, stats="*fp32", loss_parts="*fp64", HW="i32", W="i32", C="i32", NC="i32",
                   step_u="fp32", step_v="fp32", e0="fp32", ex="fp32", ey="fp32", ROWS="constexpr", STEPS="constexpr",
                   CB="constexpr", APART="constexpr")
        for apart in (False, True):
            cb, _, rows, steps = ca.triton_planes_plan((16, 512, 32, 32), size, 132, apart)
            out.append(("centroid_plane_sums" + (" fp16" if dt != dtype else "") + " apart" * apart,
                        kc.centroid_plane_sums, sig, dict(ROWS=rows, STEPS=steps, CB=cb, APART=apart),
                        dict(num_warps=kc.WARPS), ("a", "b", "stats", "C", "NC")))
    if dtype == "fp32":  # the finish reads and writes fp32 whatever the maps' dtype
        sig = dict(part="*fp32", stats="*fp32", loss_parts="*fp64", ticket="*i32", loss="*fp32", NC="i32",
                   SPLITS="i32", e0="fp32", ex="fp32", ey="fp32", PLANES="constexpr", RUNS="constexpr",
                   PARTS="constexpr")
        # 16 runs (one wave at the training size) and the most a round (4 waves: 64 runs in two)
        for runs in (16, kc.FINISH_RUNS):
            out.append((f"centroid_finish runs{runs}", kc.centroid_finish, sig,
                        dict(PLANES=kc.FINISH_PLANES, RUNS=runs, PARTS=kc.PARTS),
                        dict(num_warps=kc.FINISH_WARPS), ("part", "stats", "NC")))
        sig = dict(loss_parts="*fp64", loss="*fp32", count="i32", NC="i32", PARTS="constexpr")
        out.append(("centroid_sum_shares", kc.centroid_sum_shares, sig, dict(PARTS=kc.PARTS),
                    dict(num_warps=kc.FINISH_WARPS), ("loss_parts",)))
    return out


def compile_specs(dtype="bf16"):
    """Every DMFB kernel's specs for `dtype`. "tf32" only changes the kernels with dots (the branches', the thin
    convolution's)."""
    dots = branches_specs(dtype) + thin_conv_specs(dtype)
    return dots + ([] if dtype == "tf32" else instance_norm_specs(dtype) + bias_act_specs(dtype)
                   + max_pool_specs(dtype) + l1_loss_specs(dtype) + centroid_sums_specs(dtype))
