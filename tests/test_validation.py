"""check_choice: every string option is validated against its Literal type with one message style."""

from typing import Literal

import pytest

from vqlib.validation import check_choice, choices

Mode = Literal["a", "b", "c"]


def test_choices_come_from_the_literal_type():
    assert choices(Mode) == ("a", "b", "c")
    check_choice("mode", "b", Mode)
    with pytest.raises(ValueError, match=r"^mode must be 'a', 'b' or 'c', got 'd'$"):
        check_choice("mode", "d", Mode)
    with pytest.raises(ValueError, match=r"^mode must be 'a' or 'b', got 3$"):
        check_choice("mode", 3, Literal["a", "b"])
    with pytest.raises(TypeError, match="Literal"):
        choices(str)
