"""ONNX Runtime with switchable adapters: one base graph with LoRA slots, many adapters."""

from .session import LoadedAdapter, Session, Slot, slot_parameters

__all__ = ["LoadedAdapter", "Session", "Slot", "slot_parameters"]
