"""Control-plane policies: placement, GPU-memory and NIC accounting (standard library only)."""
