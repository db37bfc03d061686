"""KServe v2 gRPC serving for fsserve bundles."""
