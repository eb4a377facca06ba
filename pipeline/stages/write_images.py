"""`write_images`: encode each image and write it atomically to a local folder or fsspec URL.

With `sidecar: true` a `<name>.json` beside each image holds the item's metadata:
its key, URL, source fields (e.g. id, caption) and what stages added (size, stats, hash).
"""

from __future__ import annotations

from pydantic import Field

from pipeline.records import Item
from pipeline.stages.base import Sink, Stage
from pipeline.stages.registry import register
from pipeline.stages.shared.encoding import EXTENSIONS, EncodeOptions, encode, require_image
from pipeline.storage import (
    OutputPath,
    join,
    metadata_json,
    output_folder,
    output_name,
    write_output,
)


class WriteImagesOptions(EncodeOptions):
    path: OutputPath = Field(
        description="Folder or fsspec URL to write into; relative paths are inside the run dir"
    )
    sidecar: bool = Field(False, description="Also write <name>.json with the item's metadata")


@register("write_images")
class WriteImages(Sink[WriteImagesOptions]):
    """Write each image to `<path>/<stem>-<key>.<ext>`."""

    Options = WriteImagesOptions
    description = "Encode (JPEG/PNG/WebP) and write files atomically, local or fsspec"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._suffix_inputs = False

    def connect_inputs(self, inputs: list[Stage]) -> None:
        self._suffix_inputs = len(inputs) > 1

    def process(self, item: Item) -> Item:
        image = require_image(item, self.name)
        suffix = item.meta.get("from", "") if self._suffix_inputs else ""
        name = output_name(item.record, EXTENSIONS[self.options.format], suffix)
        path = join(output_folder(self.job.run_dir, self.options.path), name)
        write_output(path, encode(image, self.options))
        if self.options.sidecar:
            write_output(path.rsplit(".", 1)[0] + ".json", metadata_json(item.record))
        self.add_output(item, path)
        return item
