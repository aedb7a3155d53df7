"""The yardsticks: ``cryptoplane speed`` (``speed``, with its shared ``timing``, the
per-engine paths of ``engine_paths`` and ``openssl_speed`` beside it) and ``cryptoplane
volume bench`` (``volume_bench``). They measure and return data; the tables, progress
bars and plots are the CLI's (``cryptoplane.cli``).
"""
