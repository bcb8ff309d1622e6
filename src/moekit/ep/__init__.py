"""Expert-parallel communication: dispatch tokens to the ranks of their experts and combine them back."""

from .buffer import Buffer
from .dispatcher import CombineOutput, Dispatcher, DispatchOutput, WeightedCombineOutput
from .errors import PeerTimeout
from .event import EventOverlap
from .handle import DispatchHandle
from .layout import DispatchLayout, get_dispatch_layout
from .low_latency import LowLatencyCombineOutput, LowLatencyDispatchOutput, LowLatencyHandle
from .naive import NaiveBuffer
from .stats import Traffic, TrafficStats
from .virtual import VirtualGroup

__all__ = ["Buffer", "CombineOutput", "DispatchHandle", "DispatchLayout", "DispatchOutput", "Dispatcher",
           "EventOverlap", "LowLatencyCombineOutput", "LowLatencyDispatchOutput", "LowLatencyHandle", "NaiveBuffer",
           "PeerTimeout", "Traffic", "TrafficStats", "VirtualGroup", "WeightedCombineOutput", "get_dispatch_layout"]
