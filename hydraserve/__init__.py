"""HydraServe: serverless LLM serving with pipeline-parallel cold starts.

Importing the package is cheap: torch and the engine are imported only by the parts that run a
model (``hydraserve.engine``), never by the CLI's argument parsing or the control plane.
"""

__version__ = "0.1.0"
