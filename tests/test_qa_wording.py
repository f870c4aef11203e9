"""Refusals read as English whatever the refused folder is called (found: "choose an work folder")."""

from __future__ import annotations

import pytest

from normswap.errors import OutputPathError
from normswap.outputs import check_output_not_source


@pytest.mark.parametrize("what, article", [("output folder", "an"), ("work folder", "a")])
def test_refusal_uses_the_right_article(tmp_path, what, article):
    source = tmp_path / "model"
    source.mkdir()
    with pytest.raises(OutputPathError) as caught:
        check_output_not_source(source / "inside", source, role="student", what=what)
    assert f"choose {article} {what} outside it" in str(caught.value)
