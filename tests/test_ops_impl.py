"""The one switch every op uses to pick its fast path or its reference (dmfn_fast/ops/_impl.py)."""
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
