"""ebpf-offloader: established connections skip netfilter through XDP/TC."""

from __future__ import annotations

__version__ = "0.1.0"
