"""The thin binding to the system libbpf: load CO-RE objects, attach programs, use maps and
drain ring buffers. Nothing here knows about observers or occurrences."""

from tapio.bpf.libbpf import BpfError
from tapio.bpf.loader import BpfObject, objects_dir

__all__ = ["BpfError", "BpfObject", "objects_dir"]
