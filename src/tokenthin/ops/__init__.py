"""Pure tensor operations: batched, no nn.Module, no model knowledge."""
