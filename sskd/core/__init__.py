"""The ground floor: errors, the registry helper, atomic files, locks, stop signals. No ML; shards/ and pipelines/ build on it."""
