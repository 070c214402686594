"""docs/families.md is what the tests' `family` markers say (tests/support/families_table.py), so a family test added,
removed or changed without regenerating the page fails here."""

import pytest

from tests.support import families_table


def test_families_page_is_generated_from_the_family_markers():
    committed = (families_table.ROOT / "docs" / "families.md").read_text()
    generated = families_table.markdown(families_table.collect())
    assert committed == generated, f"docs/families.md is stale; regenerate it: {families_table.COMMAND}"


def test_every_marker_becomes_a_row(tmp_path, monkeypatch):
    """A marker on a plain test and one inside pytest.param both become rows; a bad check kind is refused."""
    monkeypatch.setattr(families_table, "ROOT", tmp_path)
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "@pytest.mark.family('fam', path='export', layout='TP2', check='logits')\n"
        "def test_a(): pass\n"
        "@pytest.mark.parametrize('x', [pytest.param(1, marks=pytest.mark.family('fam', path='import', layout='EP2', "
        "check='refused'))])\n"
        "def test_b(x): pass\n"
    )
    rows = families_table.collect(tmp_path)
    assert [(r.family, r.path, r.layout, r.check, r.test) for r in rows] == [
        ("fam", "export", "TP2", "logits", "test_x.py::test_a"),
        ("fam", "import", "EP2", "refused", "test_x.py::test_b"),
    ]
    assert "| fam | import | EP2 | refused | refused, as asserted | `test_x.py::test_b` |" in families_table.markdown(
        rows
    )
    (tmp_path / "test_x.py").write_text(
        "import pytest\n@pytest.mark.family('fam', path='export', layout='TP2', check='maybe')\ndef test_a(): pass\n"
    )
    with pytest.raises(ValueError, match="maybe"):
        families_table.collect(tmp_path)
