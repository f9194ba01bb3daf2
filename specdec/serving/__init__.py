"""Serving: a scheduler that batches requests as they arrive (specdec.serving.scheduler) and an
OpenAI-compatible HTTP server on top of it (specdec.serving.app: create_app, serve; it needs the
serve extra, so it is imported on use)."""

from .scheduler import Failed, Finished, QueueFull, Scheduler, SchedulerClosed, TextDelta, Ticket

__all__ = ["Failed", "Finished", "QueueFull", "Scheduler", "SchedulerClosed", "TextDelta", "Ticket"]
