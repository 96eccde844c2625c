"""Serving the registry's champion: `conveyor serve` (the Open Inference Protocol over HTTP and gRPC through PyTriton,
`/predict`, metrics, hot swap when the alias moves), batch prediction, the edge bundle and a Triton repository.
Imports the foundation and `pipelines/` only (the prediction log and model loading live there, shared with
monitoring)."""
