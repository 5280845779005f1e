"""Host plumbing every backend shares: ``host`` (a call's segments, chunk packing, initial
states, the kernels' buffers), ``config`` (knob merging, the cache location), ``adjoint``
(the host side of the generated backward), ``tiled`` (the host side and rendering base of
tiled kernels). Nothing here imports a backend."""
