"""stop_regex: a request's compiled stop patterns, and how far back in the decoded output they
must look.

The engine checks `stop_regex` patterns after every token, so each check must cost a bounded
window of text, not the whole output. A pattern's longest possible match (the regex parser's own
worst-case width: what SGLang sizes its tail by) sets that window; a pattern with an unbounded
repeat (`.*`, `\\d+`) is searched over at most `MAX_REGEX_LOOKBACK` characters before the newest
text, where SGLang searches the whole output. Torch-free: the API process imports it through
the detokenizer module.
"""

from __future__ import annotations

import re
from typing import Optional

try:  # Python 3.11 moved the parser; the old name still works but warns
    import re._parser as sre_parse  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - older Pythons
    import sre_parse  # type: ignore[no-redef]

# Characters an unbounded pattern may look back over, before the newest text.
MAX_REGEX_LOOKBACK = 4096


def max_match_len(pattern: str) -> int:
    """The longest text `pattern` can match, in characters (capped at MAX_REGEX_LOOKBACK)."""
    return min(sre_parse.parse(pattern).getwidth()[1], MAX_REGEX_LOOKBACK)


class StopRegexes:
    """A request's compiled stop patterns, searched over the text that could hold a new match."""

    def __init__(self, patterns: list[str]):
        self.patterns = [(p, re.compile(p)) for p in patterns]
        self.lookback = max((max_match_len(p) for p in patterns), default=0)

    def search(self, text: str, new_from: int) -> Optional[str]:
        """The first pattern (in request order) with a match in `text` that can end at or after
        `new_from` (where the newest text starts). Searching from `pos` rather than a slice keeps
        `^` and lookbehinds seeing the real text before it."""
        pos = max(new_from - self.lookback, 0)
        for p, rx in self.patterns:
            if rx.search(text, pos) is not None:
                return p
        return None
