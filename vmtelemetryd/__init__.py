"""vmtelemetryd: VM telemetry from libvirt's bulk stats to InfluxDB 3 line protocol."""
