"""An OpenAI-compatible HTTP server over the engine, with a diffusing stream and a playground.

``create_app`` builds the FastAPI app from served models (each a loaded model with its engine);
``run_server`` is what ``unmask serve`` runs. The wire protocol is in docs/serving.md.
"""

from unmask.serve.app import create_app
from unmask.serve.launch import LaunchOptions, load_served, run_server, serve_model
from unmask.serve.settings import ServedModel, ServeSettings

__all__ = ["LaunchOptions", "ServeSettings", "ServedModel", "create_app", "load_served", "run_server", "serve_model"]
