"""Datasets as labelling tools export them, brought to the YOLO layout the stages read.

Sources, told apart by what the folder holds (the source is only ever read):
- **yolo**: `data.yaml` with `names` and split folders (Ultralytics, Roboflow), or the flat `images/` + `labels/` +
  `classes.txt` that Label Studio's YOLO export writes (no splits);
- **coco**: one or several COCO JSON files (in `annotations/`, beside the images, or one per split folder as Roboflow
  writes them); a file's split comes from its name or folder (`instances_val.json`, `valid/_annotations.coco.json`);
- **voc**: Pascal VOC, `Annotations/*.xml` with `JPEGImages/` (`ImageSets/Main/<split>.txt` name the splits).

Rules, whatever the format:
- Every problem (a box outside its image, an unknown category, a file that is named but absent, duplicate image ids)
  is a `validate.Problem` in one report, and the validate stage's `on_error` policy decides: `fail` refuses the
  whole source, `skip` leaves out the images concerned and lists them.
- `data.class_map` renames, merges or drops classes before anything is written, so the dataset's class list stays
  what the registry's models know even when a labelling tool's category list changes.
- Splits the source does not name are decided by `splits.split_of` (a content hash: stable as data grows).

Why not Ultralytics' `convert_coco`: it maps categories by id (`cls91to80` or `id - 1`), not by name, writes its own
folder layout, and drops what it cannot convert without saying so; the checks above are the point of an import.

The package: `conversion` (detect the format, read, write the YOLO layout), one reader per format (`yolo`, `coco`,
`voc`), and `common` (the parsed source, split names, box lines, image sizes). The names other modules use are
re-exported here.
"""

from pipelines.formats.common import image_size
from pipelines.formats.conversion import ConvertSummary, convert, read_source

__all__ = ["ConvertSummary", "convert", "image_size", "read_source"]
