"""Reading and writing models cheaply: the loader and its checks, the protobuf wire-format
walk, the skeleton reader (large inline weights left in the file), the sinks that take fused
weights, and the staging writer. The pass reads weights through a reader (sinks.TensorReader)
and hands new ones to a sink; nothing else of it knows about files."""
