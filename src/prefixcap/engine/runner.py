"""One decode, end to end: static buffers, the prefill, the step loop, and its CUDA graphs.

What the runner needs from a decoder is written down once, as `DecoderForward`: a forward wraps
one decoder's weights (in place) and runs it against a static KV cache that it allocates itself;
the runner owns the cache tensors, the search and the step loop. The GPT-2 and Llama-family
forwards (`gpt2.GPT2Forward`, `llama.LlamaForward`) implement it, and so can a forward on another
runtime (`prefixcap.onnx.runtime.OrtDecoder`), since the runner only calls what it lists.

A `DecodeRunner` is built for one shape (batch, prefix length, spec, and whether rows differ in
length: `engine.ragged`). Step 0 prefills the prefix once per input and picks the first token;
step t > 0 feeds token t-1 and picks token t. Each step is a plain function of the runner's
buffers with shapes fixed by t alone, so the same code runs eagerly (CPU, tests) or is recorded
once per step into a CUDA graph and replayed (CUDA): one graph per step lets attention read exactly
the filled part of the cache instead of masking a maximum (ragged rows add a per-row key mask).
"""

from __future__ import annotations

from typing import Protocol

import torch

from prefixcap.engine.search import BeamSearch, GreedySearch
from prefixcap.engine.spec import DecodeSpec


class DecoderForward(Protocol):
    """A decoder's forward pass against a static KV cache, for `DecodeRunner`.

    The cache is whatever `new_cache` returns, one tensor whose dim 2 is the row and dim 4 the
    position (the runner copies prefix rows and reorders beams along those): for the torch
    forwards, [layers, 2 (key, value), rows, kv_heads, length, head_dim].
    """

    max_positions: int  # the most positions (prefix + generated) a decode may take

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def hidden_size(self) -> int: ...

    def new_cache(self, rows: int, length: int) -> torch.Tensor:
        """A zeroed cache for `rows` sequences of up to `length` positions."""
        ...

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings [rows, 1, E] of `tokens` [rows], to feed a decode step."""
        ...

    def __call__(
        self, embeds: torch.Tensor, start: int, cache: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run `embeds` [rows, S, E] at positions start..start+S-1 (the prefill: start 0, causal;
        a decode step: S = 1), writing their keys and values into `cache`; return the final
        (normed) hidden state of the last position, [rows, E].

        `lengths` [rows] (int64, on the device) is given for rows of different lengths
        (`engine.ragged`): each row's positions after this call, its own starting at 0. The
        prefill's rows are right-padded (all S positions are written) and each returns its state
        at lengths - 1; in a decode step, row r writes position lengths[r] - 1 and attends to its
        first lengths[r] positions (start + 1 is the longest row's length)."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits [rows, V] (a view is fine) from `__call__`'s hidden state."""
        ...

    def refresh(self) -> None:
        """Called at the start of every decode: bring any copy of the weights up to date."""
        ...


# Steps between checks of "have all rows finished?": the only host syncs of the loop.
FINISH_CHECK_INTERVAL = 4


class DecodeRunner:
    def __init__(
        self, model: DecoderForward, spec: DecodeSpec, batch: int, prefix_length: int, *, ragged: bool = False
    ):
        """A runner for `batch` inputs of `prefix_length` positions; `ragged`: inputs of different
        lengths, up to `prefix_length` (their lengths are given to each `run`)."""
        total = prefix_length + spec.options.max_new_tokens - 1  # the last token is never fed back
        if total > model.max_positions:
            raise ValueError(
                f"prefix ({prefix_length}) + max_new_tokens ({spec.options.max_new_tokens}) exceeds the "
                f"decoder's {model.max_positions} positions"
            )
        self.model, self.spec = model, spec
        self.batch, self.prefix_length = batch, prefix_length
        self.rows_per_input = spec.rows_per_input
        rows = batch * self.rows_per_input
        device = model.device
        self.prefix = torch.zeros((batch, prefix_length, model.hidden_size), dtype=model.dtype, device=device)
        # Beam search keeps two caches and alternates: step t reads and writes caches[t % 2], then
        # gathers the generated part of its beams' parents straight into the other one (a single
        # pass, where an in-place reorder needs a gather plus a copy back).
        self.caches = [model.new_cache(rows, total) for _ in range(2 if spec.options.num_beams > 1 else 1)]
        # rows sharing an input share its prefix: prefill it once, then copy it to each row
        self.prefix_cache = model.new_cache(batch, prefix_length) if self.rows_per_input > 1 else self.caches[0]
        self.input_of_row = torch.arange(batch, device=device).repeat_interleave(self.rows_per_input)
        # Ragged inputs: each input's length and each row's, set by `run` (right-padded rows, see
        # `DecoderForward.__call__`). The beams of an input share the cache positions before its
        # length; `shared` (a bound for all inputs) is where a beam reorder starts copying.
        self.lengths = torch.full((batch,), prefix_length, device=device) if ragged else None
        self.row_lengths = torch.full((rows,), prefix_length, device=device) if ragged else None
        self.shared = prefix_length
        self.generator = torch.Generator(device) if spec.options.do_sample else None
        if spec.options.num_beams > 1:
            self.search: GreedySearch | BeamSearch = BeamSearch(spec, batch, device)
        else:
            self.search = GreedySearch(spec, rows, device, self.generator)
        self.graphs: list[torch.cuda.CUDAGraph] | None = None

    def _prefill(self) -> None:
        """Step 0: run the prefix, share its cache among the input's rows, pick the first token."""
        hidden = self.model(self.prefix, 0, self.prefix_cache, self.lengths)
        logits = self.model.logits(hidden)
        if self.rows_per_input > 1:
            for cache in self.caches:
                shared = cache[:, :, :, :, : self.prefix_length].unflatten(2, (self.batch, self.rows_per_input))
                shared.copy_(self.prefix_cache.unsqueeze(3))
            logits = logits.index_select(0, self.input_of_row)
        self.search.select(0, logits)

    def _decode(self, step: int) -> None:
        """Step t > 0: feed token t-1 at position K+t-1 (ragged rows: at their length + t-1), pick token t."""
        position = self.prefix_length + step - 1
        cache = self.caches[step % len(self.caches)]
        lengths = None if self.row_lengths is None else self.row_lengths + step
        hidden = self.model(self.model.embed(self.search.next_input(step - 1)), position, cache, lengths)
        self.search.select(step, self.model.logits(hidden))
        if isinstance(self.search, BeamSearch) and step < self.spec.options.max_new_tokens - 1:
            # beams continue other beams: the next step's cache holds the generated part of each
            # beam's parent (the prefix part is identical for all beams of an input)
            generated = slice(self.shared, position + 1)
            following = self.caches[(step + 1) % 2][:, :, :, :, generated]
            torch.index_select(cache[:, :, :, :, generated], 2, self.search.parents, out=following)

    def _step(self, step: int) -> None:
        if step == 0:
            self._prefill()
        else:
            self._decode(step)

    @torch.no_grad()
    def capture(self) -> None:
        """Record every step into its own CUDA graph (after one eager warm-up of each kind of
        step, which also triggers any compilation). The graphs share one memory pool: they always
        replay in order, one at a time."""
        if self.lengths is not None:
            self.shared = 0  # each replay copies what its steps recorded: a bound for any lengths
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for step in range(min(2, self.spec.options.max_new_tokens)):
                self._step(step)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        self.graphs = []
        for step in range(self.spec.options.max_new_tokens):
            graph = torch.cuda.CUDAGraph()
            if self.generator is not None:
                graph.register_generator_state(self.generator)
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self._step(step)
            self.graphs.append(graph)

    @torch.no_grad()
    def run(
        self, prefix_embeds: torch.Tensor, seed: int | None = None, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decode `prefix_embeds` [b, K, E], b <= batch; returns [b * n, T] new tokens. Rows past
        b are padding: they start finished and are left out of the result. `seed` seeds sampling.
        A ragged runner takes each input's length, `lengths` [b] (CPU int64; rows right-padded)."""
        inputs = prefix_embeds.shape[0]
        self.model.refresh()
        self.prefix[:inputs] = prefix_embeds
        if self.lengths is not None:
            if lengths is None:
                raise ValueError("a ragged runner needs the lengths of its rows")
            self.lengths[:inputs] = lengths
            self.lengths[inputs:] = self.prefix_length
            torch.index_select(self.lengths, 0, self.input_of_row, out=self.row_lengths)
            if self.graphs is None:
                self.shared = int(lengths.min())
        self.search.reset(inputs)
        if self.generator is not None:
            self.generator.manual_seed(seed)
        for step in range(self.spec.options.max_new_tokens):
            if self.graphs is not None:
                self.graphs[step].replay()
            else:
                self._step(step)
            checkpoint = (step + 1) % FINISH_CHECK_INTERVAL == 0 and step + 1 >= self.spec.options.min_new_tokens
            if checkpoint and bool(self.search.all_finished()):
                break
        return self.search.result()
