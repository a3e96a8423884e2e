"""The self-contained `Example:` blocks of the public classes run as written."""

import doctest
import re

import pytest

from regionmed_clip import RegionMedCLIPConfig, RegionMedCLIPImageProcessor, RegionMedCLIPModel


@pytest.mark.parametrize("obj", [RegionMedCLIPConfig, RegionMedCLIPModel, RegionMedCLIPImageProcessor])
def test_examples_run(obj):
    # The docstrings use markdown fences (transformers' style); doctest reads the `>>>` lines inside them.
    source = re.sub(r"```(python)?", "", obj.__doc__)
    parser = doctest.DocTestParser()
    test = parser.get_doctest(source, {}, obj.__name__, None, 0)
    assert test.examples, f"{obj.__name__} has no example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.failures == 0
