"""Names vulture cannot see used: read by vulture beside the code (`[tool.vulture]` in pyproject.toml).

Run: `vulture` (or `vulture sskd pipelines shards launch/vulture-whitelist.py --min-confidence 80`).
Only names whose user is outside the code belong here; dead code is removed instead.
"""

# The second argument of every signal handler: `signal.signal` calls handler(signum, frame).
frame  # noqa: B018, F821
