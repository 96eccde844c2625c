"""Labelling round trip: frames worth labelling out to Label Studio or CVAT, labels back in as a data version."""
