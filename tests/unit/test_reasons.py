"""The reason tokens are a public interface: every one is documented in README's reason
table (what it means, whether retrying helps), and the table documents no token the
router does not give."""

from __future__ import annotations

from pathlib import Path

from router.routing.reasons import REASONS, is_reason

README = Path(__file__).resolve().parents[2] / "README.md"
HEADER = "| reason | where | meaning | retry |"


def reason_table() -> dict[str, list[str]]:
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index(HEADER)  # ValueError: the table is gone
    assert lines[start + 1].startswith("|---")
    rows: dict[str, list[str]] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 4, line
        token = cells[0].strip("`")
        assert token not in rows, f"{token} is documented twice"
        rows[token] = cells[1:]
    return rows


def test_every_reason_token_is_documented_in_the_readme() -> None:
    rows = reason_table()
    assert set(REASONS) - set(rows) == set(), "tokens without a row in README's table"
    assert set(rows) - set(REASONS) == set(), "README documents tokens the router never gives"
    for token, (where, meaning, retry) in rows.items():
        assert where and len(meaning) > 10 and retry, token


def test_the_readme_section_is_the_headers_one() -> None:
    text = README.read_text(encoding="utf-8")
    headers = text.index("\n## Headers\n")
    assert headers < text.index(HEADER) < text.index("\n## ", headers + 1)


def test_tokens_are_distinct_and_error_codes_are_not_tokens() -> None:
    assert len(REASONS) == len(set(REASONS))
    assert all(is_reason(t) for t in REASONS)
    assert not is_reason("missing_api_key") and not is_reason("") and not is_reason("spill")
