"""Storing chunk states: the document state cache and the files under it.

* :mod:`.cache`: ``DocumentStateCache`` (question-independent chunk states per document:
  a byte-bounded memory tier and an optional disk tier, with claims so that two threads
  asking about one new document compute it once);
* :mod:`.files`: checked safetensors files (atomic writes, digests), ``SafeDir`` (a folder
  opened once, entries reached relative to it with ``O_NOFOLLOW``) and the row-file format
  (per-row SHA-256 and an entry digest, optionally an HMAC) that the disk tier uses.
"""
