"""fusion-serve client: gRPC stubs, FusionClient / AsyncFusionClient and the `fusion` CLI front."""
