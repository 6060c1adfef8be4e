"""Data-side code: object storage, corpus reading, the Parquet vector store and the Qdrant index."""
