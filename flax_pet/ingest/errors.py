"""The exception that ingestion raises for invalid or unsupported input."""


class IngestError(ValueError):
  """Input that cannot be ingested: the message names the file or value and the fix."""
