"""sskd: knowledge distillation with self-supervision, fed by DALI pipelines over webdataset shards."""

__version__ = "0.1.0"
