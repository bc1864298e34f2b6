"""Tools around the kernel, not on the hot path: the Prometheus exporter, `voxbus top`, recordings,
the self-check and the embedded Redis. Nothing in `shared/` outside this package imports it."""
