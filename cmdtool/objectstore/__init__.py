"""Object-storage access shared by the store and the checkpoint readers (stage 0).

``url`` parses ``s3://bucket/prefix`` style URLs, ``client`` builds (and caches) an
obstore store for a URL from the environment, ``errors`` maps client failures to
one-line :mod:`cmdtool.errors` exceptions, and ``ops`` holds the few operations the
tool needs (list, head, get, ranged gets, conditional put, delete).  Nothing here
imports a higher stage; obstore itself is imported lazily (the ``s3`` extra).
"""

from __future__ import annotations

from cmdtool.objectstore.url import SCHEMES, ObjectURL, is_url, parse

__all__ = ["SCHEMES", "ObjectURL", "is_url", "parse"]
