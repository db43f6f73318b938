"""The one error type a user sees: a single line that names the file, sample or field at fault."""


class SSKDError(Exception):
    """Bad input or an unusable artefact (shard, cache, checkpoint, config).

    The CLI prints ``sskd: error: <message>`` on one line and exits with status 2; library callers can
    catch it. The message must name what is wrong and where (a path, a sample key, a config field).
    """


def report_problems(where, problems: list[str], ok: str) -> int:
    """The end of a ``verify`` command: each problem as ``FAIL ...`` and exit status 1, or ``ok`` and 0."""
    import sys

    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    if problems:
        print(f"sskd: error: {where}: {len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print(ok)
    return 0
