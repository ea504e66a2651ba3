"""Protocol buffers (generated at build time from ../../protos/*.proto)."""
