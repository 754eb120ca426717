"""fusion-serve client: gRPC stubs, FusionClient / AsyncFusionClient and the `fusion` CLI front."""

from fusion_client._proto.fusion.v1 import fusion_pb2, fusion_pb2_grpc
from fusion_client.client import AsyncFusionClient, FusionClient, build_request

__all__ = ["AsyncFusionClient", "FusionClient", "build_request", "fusion_pb2", "fusion_pb2_grpc"]
