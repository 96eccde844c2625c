"""Serving the registry's champion: `conveyor serve` (the Open Inference Protocol over HTTP and gRPC through PyTriton,
`/predict`, metrics, hot swap when the alias moves), batch prediction, the edge bundle and a Triton repository.
Imports the foundation and `pipelines/` only (the prediction log and model loading live there, shared with
monitoring)."""

TOKEN_ENV = "CONVEYOR_SERVE_TOKEN"  # the server's bearer token; the stack hands it to Prometheus too
