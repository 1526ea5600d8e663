"""Offline data jobs: tokenizer training, shard writing, verification and inspection.

Run ``python -m data_prep <job> --help``; the jobs are ``tokenizer``, ``shards``, ``verify`` and
``inspect``.
"""


class DataPrepError(RuntimeError):
    """A job cannot go on: bad input, a refused output location, or too little data."""
