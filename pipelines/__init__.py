"""The DAG's steps, one module per `dvc.yaml` stage (synth/data, validate, train, evaluate, export, profile, gate),
and what the layers above share: runtimes and inference (bytes to detections), features, the registry and opening
a registered version (`model_source`), a version's drift reference, the prediction log, DVC. Imports only the
foundation (`conveyor/`)."""
