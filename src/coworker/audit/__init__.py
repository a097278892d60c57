"""The audit trail: records, the hash chain, stores, the exporter and verification."""
