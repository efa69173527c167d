"""The end-to-end experiment's workloads (torch-free): invocation traces (Azure Functions 2021 or
synthetic), the paper's transformation into LLM requests, replay against a server, analysis."""
