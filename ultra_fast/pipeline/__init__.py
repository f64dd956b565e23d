"""Running the segmentation over many files, reliably: the jobs around the algorithm.

- ``manifest``: per-input JSON-lines records (durable appends, resume, per-rank merge);
- ``settings_file``: ``run.json``, the settings an output folder is bound to (after its first image);
- ``outputs``: output paths, refusing to overwrite inputs or to write into an input folder, atomic writes;
- ``lock``: one run per output folder (``flock``, released when the holder exits or dies);
- ``runner``: the loop (DataLoader prefetch, same-size batches, error policy, sharding under torchrun).

The algorithm itself (one image's labels from its maps) is ``ultra_fast.segmentation.run``.
"""
from .lock import LOCK_FILE, OutputBusyError, OutputLock
from .manifest import MANIFEST, ManifestWriter, completed, merge_manifests, read_records
from .outputs import SUBDIRS, check_no_overwrite, check_out_dir, output_paths, write_outputs
from .runner import RunSummary, process_batch, run
from .settings_file import RUN_FILE, check_settings, record_settings

__all__ = ["LOCK_FILE", "OutputBusyError", "OutputLock", "MANIFEST", "ManifestWriter", "completed", "merge_manifests",
           "read_records", "SUBDIRS", "check_no_overwrite", "check_out_dir", "output_paths", "write_outputs",
           "RunSummary", "process_batch", "run", "RUN_FILE", "check_settings", "record_settings"]
