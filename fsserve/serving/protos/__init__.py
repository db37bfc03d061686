"""Protocol files and generated modules for the KServe v2 gRPC API (see generate.py)."""
