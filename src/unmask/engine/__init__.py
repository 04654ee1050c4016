"""Serving many requests with one model: a bounded queue, step-level batching, streamed events."""

from unmask.engine.core import Engine, EngineClosed, EngineRequest, Final, Frame, Handle, QueueFull
from unmask.engine.jobs import ARJob, DiffusionJob

__all__ = ["ARJob", "DiffusionJob", "Engine", "EngineClosed", "EngineRequest", "Final", "Frame", "Handle", "QueueFull"]
