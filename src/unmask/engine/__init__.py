"""Serving many requests with one model: a bounded queue, step-level batching, streamed events."""

from unmask.engine.core import MAX_BATCH, MAX_QUEUE, Engine, EngineClosed, EngineRequest, Final, Frame, Handle, QueueFull

__all__ = ["MAX_BATCH", "MAX_QUEUE", "Engine", "EngineClosed", "EngineRequest", "Final", "Frame", "Handle", "QueueFull"]
