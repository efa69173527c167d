"""The simulator: the real control plane on a virtual-time event loop, a simulated cluster."""
