"""`conveyor drift`: the current window (the prediction log or a folder), the verdict per group of features with
Evidently's statistics, the label-free performance estimate, and the alert policy. Imports the foundation and
`pipelines/` only: no web framework, no model server."""
