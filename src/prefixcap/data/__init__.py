"""Caption datasets: one reader for each common format, all giving the same `CaptionRecord`s."""

from prefixcap.data.formats import FORMATS, load_records
from prefixcap.data.records import SPLITS, CaptionRecord, split_records
from prefixcap.inputs.sources import read_image_bytes

__all__ = ["FORMATS", "SPLITS", "CaptionRecord", "load_records", "read_image_bytes", "split_records"]
