"""Writers from each source format to webdataset shards, DALI index building, verification."""

from shards.writer import ShardOptions, write_digits, write_shards

__all__ = ["ShardOptions", "write_digits", "write_shards"]
