"""The edge node ("SVR") of a site: durable DICOM store, journal, query/retrieve.

Pure code: no Prefect import anywhere under `edge/`. The modules:

- `store`     durable file store (temporary file, fsync, atomic rename, directory fsync)
- `journal`   the edge's local index and outbox (SQLite in WAL mode)
- `parsing`   reading the attributes the journal needs from received bytes
- `matching`  C-FIND matching rules on decoded unicode values (reused by the center)
- `qr`        query/retrieve sources and the access decision
- `fastnet`   pynetdicom association classes tuned for throughput
- `server`    `EdgeServer`: the DICOM node (C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET)
- `scu`       the edge as a client of the site PACS (send, pull)
- `tls`       TLS contexts from the configuration
"""
