"""Stage 3 of the flow: named tensors -> store rows (``cmdtool ingest``)."""

from cmdtool.ingestion.ingest import IngestSummary, fingerprint, ingest

__all__ = ["IngestSummary", "fingerprint", "ingest"]
