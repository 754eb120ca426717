"""fusion-serve server: vLLM member engines, lock-step router, fusion policies, gRPC API."""
