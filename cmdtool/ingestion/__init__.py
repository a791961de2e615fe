"""Stage 3 of the flow: named tensors -> store rows (``cmdtool ingest``)."""

from cmdtool.ingestion.ingest import IngestSummary, create_store, fingerprint, ingest

__all__ = ["IngestSummary", "create_store", "fingerprint", "ingest"]
