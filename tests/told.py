"""What a user reads when alignflow refuses an input: the one report, never a traceback, an exception repr
or a Prefect ERROR line (every test of a failing input checks its output with `told`)."""

import re
import subprocess

REPR = re.compile(r"\b[A-Z]\w*(Error|Exception)\(")  # DataError("..."), ValueError('...')


def told(result: subprocess.CompletedProcess, *words: str, code: int = 2, report: str = "bad input data: ") -> str:
    """Exit `code` with `report` and `words` on stderr, and nothing a user would read as a crash."""
    out = result.stdout + result.stderr
    assert result.returncode == code, out[-4000:]
    assert report in result.stderr, out[-4000:]
    for w in words:
        assert w in result.stderr, (w, out[-4000:])
    assert "Traceback" not in out and not REPR.search(out) and "| ERROR" not in out, out[-4000:]
    return result.stderr
