"""CUDA-graph capture of the decoder's step pieces, without a compiler.

``torch.compile(fullgraph=True)`` traces a piece (the draft pass, the verify pass, a plain step's halves) into one
FX graph; instead of handing it to inductor, :class:`GraphCapture` (a torch.compile backend) records the traced
graph once in a CUDA graph and replays it at every later step. The traced graph calls the same operations as the
eager step, the package's kernels included, in place: nothing is functionalized, so the KV cache is written where
it lies, as in the eager step.

Why not inductor's ``mode="reduce-overhead"`` (still available through ``compile_steps``): it compiles every piece
and shape for tens of seconds on a 7B model (more on small ones than their whole answer takes), and adaptive drafting
has a piece per draft length. Capture costs one more run of the piece. What the kernels would gain from inductor's
fusions (norms, rotary, activations) is small beside the launches the graph removes.

What a replay needs, and where it comes from:

- The graph's inputs keep the addresses they had at capture. Static inputs (parameters, and tensors marked with
  ``torch._dynamo.mark_static_address``: the cache's buffer and lengths) are read in place, and their addresses are
  checked at every call (a changed one captures again); every other tensor input (the rows' lengths, x0, the draft's
  outputs) is copied into the graph's own copy first.
- Python values the piece reads (host lengths, plan choices) are constants of the graph: dynamo guards on them,
  and a piece that recompiled every step would be wrong to capture (``tests/decoding/test_compile.py`` checks one
  graph per piece).
- The outputs are the graph's own memory, written again at every replay: callers copy what must outlive the next
  replay (the decoder clones a piece's outputs).
- Capture records without running: the piece runs once first (a warm-up on a side stream, as CUDA graphs require,
  with the cache's lengths put back afterwards), then the recorded graph is replayed for the call itself.

On a CPU, :class:`GraphCapture` emulates the same contract (copied inputs, static inputs at their captured
addresses, outputs overwritten at every call) by calling the traced graph, so the CPU tests check everything but
the recording itself.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn


def _is_static(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, nn.Parameter) or getattr(tensor, "_dynamo_static_input_type", None) is not None


class _Replay:
    """One traced graph and its capture: called with the graph's inputs, returns its outputs (the same tensors,
    overwritten, at every call)."""

    def __init__(self, graph_module: torch.fx.GraphModule, restore: Callable[[], Sequence[torch.Tensor]]):
        self.graph_module, self.restore = graph_module, restore
        self.inputs: Optional[List] = None       # the graph's inputs: static ones as captured, copies of the others
        self.static: List[bool] = []
        self.pointers: List[Tuple[int, int]] = []     # (input index, address at capture) of the static inputs
        self.copied: List[int] = []                    # the tensor inputs copied in before each replay
        self.outputs = None
        self.graph: Optional["torch.cuda.CUDAGraph"] = None

    def __call__(self, *inputs):
        if self.inputs is None or any(inputs[i].data_ptr() != pointer for i, pointer in self.pointers):
            return self._capture(inputs)
        for i in self.copied:
            self.inputs[i].copy_(inputs[i])
        if self.graph is not None:
            self.graph.replay()
        else:     # the CPU's emulation: the same inputs, the outputs written over the previous call's
            for kept, new in zip(self.outputs, self.graph_module(*self.inputs)):
                if isinstance(kept, torch.Tensor):
                    kept.copy_(new)
        return self.outputs

    def _capture(self, inputs):
        self.static = [isinstance(value, torch.Tensor) and _is_static(value) for value in inputs]
        self.pointers = [(i, value.data_ptr()) for i, value in enumerate(inputs) if self.static[i]]
        self.copied = [i for i, value in enumerate(inputs) if isinstance(value, torch.Tensor) and not self.static[i]]
        self.inputs = [value if static or not isinstance(value, torch.Tensor) else value.clone()
                       for value, static in zip(inputs, self.static)]
        cuda = any(isinstance(value, torch.Tensor) and value.is_cuda for value in inputs)
        if not cuda:
            outputs = self.graph_module(*self.inputs)
            self.outputs = type(outputs)(value.clone() if isinstance(value, torch.Tensor) else value
                                         for value in outputs)
            return self.outputs
        # the warm-up: lazy initialisations (cuBLAS workspaces, kernels' first launches) happen outside the
        # capture; the lengths it advances are put back, and the positions it wrote the replay writes again
        saved = [tensor.clone() for tensor in self.restore()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                self.graph_module(*self.inputs)
        finally:
            torch.cuda.current_stream().wait_stream(side)
            for tensor, value in zip(self.restore(), saved):
                tensor.copy_(value)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.outputs = self.graph_module(*self.inputs)
        self.graph = graph
        graph.replay()                 # capture records without running: this call's own run
        return self.outputs


class GraphCapture:
    """A torch.compile backend: each traced graph recorded in a CUDA graph at its first call and replayed after
    (emulated on a CPU). ``restore()``: the static tensors a warm-up run writes that must be put back (the
    cache's lengths)."""

    def __init__(self, restore: Callable[[], Sequence[torch.Tensor]] = tuple):
        self.restore = restore
        self.graphs: List[_Replay] = []

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs):
        replay = _Replay(graph_module, self.restore)
        self.graphs.append(replay)
        return replay
