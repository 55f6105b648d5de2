"""Sizing fair arms of the Over-Encoding family (``docs/oe_family.md``): equal table parameters, equal totals.

Placeholder: filled in below.
"""


def longcat_m(vocab_ratio: float, vocab_size: int) -> int:
    """LongCat's ``oe_vocab_size_ratio`` r as our m: table i then has int(r·V + 2i + 1) = m + 2i + 1 rows."""
    return int(vocab_ratio * vocab_size)
