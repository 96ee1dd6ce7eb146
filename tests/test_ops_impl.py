"""The one switch every op uses to pick its fast path or its reference (dmfn_fast/ops/_impl.py), and the
environment switches the package reads."""
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from dmfn_fast.ops import _impl


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv("DMFN_IMPL", raising=False)
    monkeypatch.setattr(_impl, "_warned", set())


def _refuse():
    raise AssertionError("must not be asked when the reference is chosen anyway")


@pytest.mark.parametrize("impl", ["auto", "fast", "reference"])
def test_reference_asks_nothing(impl, monkeypatch):
    if impl != "reference":
        monkeypatch.setenv("DMFN_IMPL", "reference")
    assert not _impl.resolve(impl, _refuse, op="op", missing=_refuse, prefer_fast=_refuse)


def test_auto_rule_decides_before_availability():
    assert not _impl.resolve("auto", _refuse, op="op", missing=_refuse, prefer_fast=lambda: False)
    # "fast" forces the fast path wherever the auto rule would not take it.
    assert _impl.resolve("fast", lambda: "", op="op", missing=lambda: "", prefer_fast=lambda: False)


def test_runs_fast_when_it_can():
    assert _impl.resolve("auto", lambda: "", op="op", missing=lambda: "")
    assert _impl.resolve("fast", lambda: "", op="op")


@pytest.mark.parametrize("where", ["why_not", "missing"])
def test_forced_fast_raises_with_the_reason(where):
    why_not, missing = (lambda: "a CPU tensor", lambda: "") if where == "why_not" else (lambda: "", lambda: "no lib")
    with pytest.raises(RuntimeError, match="impl='fast'.*the myop fast path cannot run: " +
                       ("a CPU tensor" if where == "why_not" else "no lib")):
        _impl.resolve("fast", why_not, op="myop", missing=missing)


def test_auto_falls_back_with_one_warning_when_missing():
    with pytest.warns(RuntimeWarning) as record:
        for _ in range(3):
            assert not _impl.resolve("auto", lambda: "", op="myop", missing=lambda: "libfoo is not built")
    msgs = [str(w.message) for w in record]
    assert len(msgs) == 1 and "libfoo is not built" in msgs[0] and "myop" in msgs[0] and "reference" in msgs[0]


def test_auto_falls_back_silently_for_inputs_the_fast_path_does_not_take():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # an input it never takes: `missing` is not even asked (no warning about a path that would not run)
        assert not _impl.resolve("auto", lambda: "a CPU tensor", op="myop", missing=_refuse)


def test_fused_is_a_deprecated_alias_of_fast():
    with pytest.warns(DeprecationWarning, match="'fused' is deprecated, use impl='fast'") as record:
        assert _impl.check_impl("fused") == "fast"
        assert _impl.check_impl("fused") == "fast"
        with pytest.raises(RuntimeError, match="impl='fast'"):
            _impl.resolve("fused", lambda: "no GPU", op="op")
    assert len([w for w in record if issubclass(w.category, DeprecationWarning)]) == 1


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'reference', 'fast'\)"):
        _impl.check_impl("cuda")
    with pytest.raises(ValueError):
        _impl.resolve("cuda", _refuse, op="op")


def test_the_models_and_the_loss_go_through_the_resolver(monkeypatch):
    """DMFB.forward and centroid_align_loss hand their impl to the same resolver, nothing else decides."""
    from dmfn_fast.models import DMFB, Generator
    from dmfn_fast.ops import centroid_align as ca

    calls = []

    def spy(impl, why_not, *, op, missing=None, prefer_fast=None):
        calls.append((op, impl))
        return False

    monkeypatch.setattr(_impl, "resolve", spy)
    block = DMFB(16, 8, impl="fast")
    x = torch.randn(1, 16, 5, 6)
    with torch.no_grad():
        assert torch.equal(block(x), block.forward_reference(x))  # the spy said: reference
    a = torch.rand(1, 2, 3, 4)
    ca.centroid_align_loss(a, a + 1, impl="auto")
    assert calls == [("DMFB", "fast"), ("centroid alignment loss", "auto")]
    with pytest.warns(DeprecationWarning):
        g = Generator(nf=4, n_blocks=2, impl="fused")
    assert g.impl == "fast" and all(b.impl == "fast" for b in g.blocks)


# ----------------------------------------------------------------------------- the environment switches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_graphs_switches_are_on_inside_graph_regions_only():
    """A kernel switch's "graphs" (the default of those that cost host time per call) is on inside
    _impl.graphs() (train.py --cuda-graphs' warm-up and capture), nested or not, and off again after it, an
    exception included; "1" is on and "0" off everywhere."""
    assert not _impl.switch_on("graphs") and _impl.switch_on("1") and not _impl.switch_on("0")
    with _impl.graphs():
        with _impl.graphs():
            assert _impl.switch_on("graphs")
        assert _impl.switch_on("graphs") and _impl.switch_on("1") and not _impl.switch_on("0")
    with pytest.raises(KeyError):
        with _impl.graphs():
            raise KeyError
    assert not _impl.switch_on("graphs")


def test_thin_conv_auto_rule(monkeypatch):
    """The thin-input kernel under auto: the generator's (per_call_wins: it won per call too) anywhere unless
    DMFN_THIN_CONV=0; the discriminator's where the switch is on (by default in graph regions only); neither
    where the DMFB's rule declines the dtype (fp32)."""
    from dmfn_fast.ops import dmfb
    from dmfn_fast.ops import thin_conv as tc
    monkeypatch.setattr(tc, "available", lambda: True)
    monkeypatch.setattr(tc, "fast_why_not", lambda x: "")
    half = True
    monkeypatch.setattr(dmfb, "auto_prefers_fused", lambda x: half)
    x = torch.zeros(1)
    for value, g_out, d_out, g_in, d_in in (("graphs", True, False, True, True), ("1", True, True, True, True),
                                           ("0", False, False, False, False)):
        monkeypatch.setattr(tc, "_AUTO", value)
        assert (tc.use_fast(x, per_call_wins=True), tc.use_fast(x)) == (g_out, d_out), value
        with _impl.graphs():
            assert (tc.use_fast(x, per_call_wins=True), tc.use_fast(x)) == (g_in, d_in), value
        assert tc.use_fast(x, "fast") and not tc.use_fast(x, "reference", per_call_wins=True)
    half = False
    monkeypatch.setattr(tc, "_AUTO", "1")
    assert not tc.use_fast(x, per_call_wins=True) and not tc.use_fast(x)


@pytest.mark.parametrize("op", ["bias_act", "max_pool", "l1_loss"])
def test_graphs_kernels_auto_rule(op, monkeypatch):
    """The bias+ReLU, max-pool and L1 kernels under auto: by default (graphs) inside a graph region only, 1
    everywhere, 0 nowhere; fp16/bf16 only (they were timed in bf16 alone); impl="fast" always."""
    import importlib
    mod = importlib.import_module(f"dmfn_fast.ops.{op}")
    monkeypatch.setattr(mod, "available", lambda: True)
    monkeypatch.setattr(mod, "fast_why_not", lambda *a: "")
    x = torch.zeros(1, 4, 2, 2, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)

    def asks(t, impl="auto"):
        return mod.use_fast(t, t, None, impl) if op == "l1_loss" else mod.use_fast(t, impl)

    for value, outside, inside in (("graphs", False, True), ("1", True, True), ("0", False, False)):
        monkeypatch.setattr(mod, "_AUTO", value)
        assert asks(x) == outside, value
        with _impl.graphs():
            assert asks(x) == inside and not asks(x.float()), value
        assert asks(x.float(), "fast") and not asks(x, "reference")


@pytest.mark.parametrize("name", list(_impl.SWITCHES))
def test_each_switch_takes_its_values_and_refuses_others(name, monkeypatch):
    values = _impl.SWITCHES[name]
    for unset in (None, "", "  "):
        if unset is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, unset)
        assert _impl.env_switch(name) == values[0]
    for v in values:
        monkeypatch.setenv(name, f" {v.upper()} ")  # as typed: spaces and case do not matter
        assert _impl.env_switch(name) == v
    for bad in ("true", "yes", "9", "referenc"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=f"{name}='{bad}' is not one of {', '.join(values)}.*unset it"):
            _impl.env_switch(name)
        with pytest.raises(ValueError, match=name):
            _impl.check_environment()


def test_a_misspelt_impl_switch_is_refused_where_it_is_read(monkeypatch):
    """DMFN_IMPL is read per call: a typo must not quietly run the fast path."""
    monkeypatch.setenv("DMFN_IMPL", "refrence")
    with pytest.raises(ValueError, match="DMFN_IMPL='refrence'"):
        _impl.resolve("auto", lambda: "", op="test op")
    monkeypatch.setenv("DMFN_IMPL", "Reference")
    assert _impl.forced_reference() and not _impl.resolve("auto", _refuse, op="test op")


def test_an_unknown_dmfn_variable_is_named_with_the_likely_switch(monkeypatch):
    monkeypatch.setenv("DMFN_WGRAD_TAM", "0")
    with pytest.warns(RuntimeWarning, match="does not read the environment variable DMFN_WGRAD_TAM .did you mean "
                                             "DMFN_WGRAD_TMA.."):
        _impl.check_environment()
    monkeypatch.setenv("DMFN_VGG19_WEIGHTS", "/some/file.pth")  # a file, not a switch: no warning about it
    monkeypatch.delenv("DMFN_WGRAD_TAM")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _impl.check_environment()


def test_every_dmfn_variable_the_code_names_is_known():
    """A switch read anywhere in the package or the extension is in SWITCHES (so import validates it), and the
    package reads switches only through env_switch."""
    names, direct = set(), []
    for folder in ("dmfn_fast", "csrc"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith((".py", ".cpp", ".cu", ".h")):
                    text = open(os.path.join(dirpath, f)).read()
                    names |= set(re.findall(r"\bDMFN_[A-Z0-9_]+\b", text))
                    direct += [f"{f}: {m}" for m in re.findall(r"os\.environ(?:\.get)?[\[(]\"(DMFN_[A-Z0-9_]+)", text)
                               if m not in _impl.OTHER_VARIABLES]
    names.discard("DMFN_PY_MODULE")  # a compile definition of setup.py's build, not a variable
    assert names <= set(_impl.SWITCHES) | set(_impl.OTHER_VARIABLES), names - set(_impl.SWITCHES)
    assert not direct, f"switches read without env_switch: {direct}"


def test_import_and_train_py_refuse_a_bad_switch_before_any_work(tmp_path):
    env = dict(os.environ, DMFN_TMA="false", DMFN_IMPL="fast")
    r = subprocess.run([sys.executable, "-c", "import dmfn_fast"], capture_output=True, text=True, env=env)
    assert r.returncode != 0
    assert "DMFN_IMPL='fast' is not one of auto, reference" in r.stderr and "DMFN_TMA='false'" in r.stderr
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--steps", "1", "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("train.py: error: dmfn_fast: the environment variable DMFN_IMPL='fast'")
    assert not out.exists()
