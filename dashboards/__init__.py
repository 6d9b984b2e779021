"""The operator's dashboard: a small HTTP server over the catalog and the edges' journals."""
