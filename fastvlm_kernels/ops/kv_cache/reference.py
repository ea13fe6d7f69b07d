"""Plain PyTorch kv_compact: per layer and row, an index copy of the accepted positions. The oracle of
every other backend."""
import torch


def kv_compact_reference(buffer: torch.Tensor, start: torch.Tensor, accepted: torch.Tensor) -> None:
    """Moves ``buffer[l, :, b, :, start[b] + accepted[b, j]]`` to ``start[b] + j`` in place, for every layer
    l, row b and j with ``accepted[b, j] >= 0`` (see kv_compact). Reads the indices on the host."""
    num_layers, batch = buffer.shape[0], buffer.shape[2]
    starts = start.tolist()
    rows = accepted.tolist()
    for b in range(batch):
        nodes = [node for node in rows[b] if node >= 0]
        if not nodes:
            continue
        source = torch.tensor([starts[b] + node for node in nodes], device=buffer.device)
        destination = torch.arange(starts[b], starts[b] + len(nodes), device=buffer.device)
        for layer in range(num_layers):
            # Advanced indexing gathers into a new tensor before the write: overlap cannot corrupt it.
            buffer[layer, :, b, :, destination] = buffer[layer, :, b, :, source]


def kv_append_reference(k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                        keys: torch.Tensor, values: torch.Tensor) -> None:
    """Writes ``keys[b, :, t]`` to ``k_cache[b, :, lengths[b] + t]`` (and values likewise) in place, for
    every row b and new token t (see kv_append). Reads the lengths on the host."""
    num_new = keys.shape[2]
    for b, length in enumerate(lengths.tolist()):
        k_cache[b, :, length:length + num_new] = keys[b]
        v_cache[b, :, length:length + num_new] = values[b]
