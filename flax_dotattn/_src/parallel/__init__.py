"""Attention over several devices.

* :mod:`.key_sharded`: ``sequence_parallel_attention`` (keys and values sharded).
* :mod:`.ring`: ``ring_attention`` (queries, keys and values sharded; a ring).
"""
