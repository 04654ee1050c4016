"""Serving many requests with one model: a bounded queue, step-level batching, streamed events."""

from unmask.engine.core import Engine, EngineClosed, EngineRequest, Final, Frame, Handle, QueueFull

__all__ = ["Engine", "EngineClosed", "EngineRequest", "Final", "Frame", "Handle", "QueueFull"]
