"""Labelling round trip: frames worth labelling out to Label Studio or CVAT, labels back in as a data version. Imports
the foundation and `pipelines/` only (it reads the prediction log where the drift check does)."""
