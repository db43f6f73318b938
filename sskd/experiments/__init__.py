"""Tools on top of the engine: sweeps, reports, analyses, the digits demo."""
