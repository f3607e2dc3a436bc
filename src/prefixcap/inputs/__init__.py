"""Image inputs: what a name is (a file, a shard, a stored image), expanding folders and patterns,
decoding and preprocessing images, and the loader that streams them as uint8 batches."""
