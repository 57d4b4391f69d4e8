"""The worked examples in the docstrings are part of the documentation: run them."""

import doctest

import pytest

import hwquant.hw.cost
import hwquant.numerics.uniform
import hwquant.spec


@pytest.mark.parametrize("module", [hwquant.numerics.uniform, hwquant.spec, hwquant.hw.cost], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
