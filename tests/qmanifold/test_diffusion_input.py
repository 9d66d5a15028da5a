"""Input validation of :class:`qmanifold.QuotientDiffusion` (issue 16, item 4).

* a denoiser that is not callable is refused by the constructor, not at the first call;
* ``steps`` (and ``chunk_size``) must be positive integers: ``True`` is not one step, ``2.0`` is
  not two; NumPy integers are integers;
* ``sample`` refuses a mask with an all-False row, with the message ``loss`` gives;
* ``loss(check_output=False)`` lets a non-finite denoiser output through (the training loop's
  skip path); the default keeps the check.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qmanifold import Quotient, QuotientDiffusion
from qmanifold.groups import SE3

F64 = torch.float64


def _zero(x, t, mask=None, **cond):
    return torch.zeros_like(x)


@pytest.fixture(scope="module")
def model():
    return QuotientDiffusion(Quotient(SE3), _zero)


@pytest.mark.parametrize("denoiser", [None, 3, "egnn", torch.zeros(3)], ids=["none", "int", "str", "tensor"])
def test_constructor_rejects_a_non_callable_denoiser(denoiser):
    with pytest.raises(TypeError, match=r"denoiser must be a torch.nn.Module or a callable"):
        QuotientDiffusion(Quotient(SE3), denoiser)


def test_constructor_accepts_modules_and_functions():
    QuotientDiffusion(Quotient(SE3), torch.nn.Identity())
    QuotientDiffusion(Quotient(SE3), _zero)


@pytest.mark.parametrize("steps", [True, False, 2.0, 0, -3, "4", None, torch.tensor(3)])
def test_sample_rejects_steps_that_are_not_positive_integers(model, steps):
    with pytest.raises(ValueError, match=r"steps must be a positive integer, got"):
        model.sample((2, 4, 3), steps=steps, dtype=F64)


@pytest.mark.parametrize("chunk_size", [True, 1.5, 0])
def test_sample_rejects_bad_chunk_sizes(model, chunk_size):
    with pytest.raises(ValueError, match=r"chunk_size must be a positive integer"):
        model.sample((2, 4, 3), steps=2, chunk_size=chunk_size, dtype=F64)


def test_sample_accepts_python_and_numpy_integers(model):
    g = torch.Generator().manual_seed(0)
    a = model.sample((2, 4, 3), steps=3, generator=g, dtype=F64)
    g = torch.Generator().manual_seed(0)
    b = model.sample((2, 4, 3), steps=np.int64(3), generator=g, dtype=F64)
    assert torch.equal(a, b)
    assert model.sample((2, 4, 3), steps=2, dtype=F64, chunk_size=np.int32(1)).shape == (2, 4, 3)


def test_sample_rejects_an_all_false_mask_row_like_loss(model):
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    x1 = torch.randn(3, 4, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError) as from_loss:
        model.loss(x1, mask)
    with pytest.raises(ValueError) as from_sample:
        model.sample(mask=mask, steps=2, dtype=F64)
    assert str(from_sample.value) == str(from_loss.value)
    assert "no real point" in str(from_sample.value) and "[1]" in str(from_sample.value)
    with pytest.raises(ValueError, match="no real point"):  # the chunked path too
        model.sample(mask=mask, steps=2, dtype=F64, chunk_size=1)


def test_deferred_checks_report_an_all_false_mask_row_when_sampling_ends(model, monkeypatch):
    """On an accelerator the mask check joins the deferred finiteness check (no host sync before or
    during sampling); emulated on the CPU by forcing the deferred path."""
    from qmanifold import diffusion as D

    monkeypatch.setattr(D, "_defer_finite_checks", lambda device: True)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2] = False
    with pytest.raises(ValueError, match=r"mask has a configuration with no real point \(batch row\(s\) \[2\]\)"):
        model.sample(mask=mask, steps=2, dtype=F64)
    mask[2, 0] = True
    assert model.sample(mask=mask, steps=2, dtype=F64).shape == (3, 4, 3)


def test_sample_without_validation_skips_the_mask_check_as_loss_does():
    quiet = QuotientDiffusion(Quotient(SE3), _zero, validate=False)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0] = False
    out = quiet.sample(mask=mask, steps=2, dtype=F64)
    assert out.shape == (2, 4, 3) and torch.all(out[0] == 0)


def test_loss_check_output_flag():
    nan_model = QuotientDiffusion(Quotient(SE3), lambda x, t, mask=None: x * float("nan"))
    x1 = torch.randn(2, 4, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="denoiser output contains"):
        nan_model.loss(x1)
    assert bool(torch.isnan(nan_model.loss(x1, check_output=False)))
    # the data are still checked with check_output=False
    bad = x1.clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        nan_model.loss(bad, check_output=False)
    # forward (what DDP wraps) passes the flag on
    assert bool(torch.isnan(nan_model(x1, check_output=False)))
