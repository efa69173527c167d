"""The gateway: OpenAI-compatible API, admin API and metrics in front of the control plane."""
