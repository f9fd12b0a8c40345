"""Per-layer bit allocation: the library's second problem family (``evolq allocate``).

``menu`` (the options and their packed sizes), ``tables`` (every layer quantized at every
width once), ``fitness`` (an allocation's loss, cached and memoised)."""
